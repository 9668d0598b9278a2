"""The losses (docs/METHOD.md, Losses) as pure functions on L2-normalised embeddings. Shapes:
B batch, D embedding dim, K queue length, L local segments; ``queue`` is ``[D, K]`` (as CoCLR)."""
import torch
import torch.nn.functional as F

from dataset.video_dataset import QUERY_SEGMENT


def global_logits(q, k, queue, tau):
    """``[B, 1+K]``: ``[q·k, q·queue] / tau`` (MoCo)."""
    pos = (q * k).sum(1, keepdim=True)                  # B x 1
    neg = q @ queue                                      # B x K
    return torch.cat([pos, neg], 1) / tau


def info_nce(logits):
    """Cross-entropy with the positive at index 0, averaged over rows."""
    return F.cross_entropy(logits, logits.new_zeros(logits.shape[0], dtype=torch.long))


def local_losses(q_local, k_local, queue, tau):
    """``(inter, intra, inter_top1)`` (docs/METHOD.md, Losses) for q_local ``[B, D]`` (view 1's
    clip QUERY_SEGMENT) and k_local ``[B, L, D]`` (view 2's L local clips); inter_top1: share of
    inter rows whose positive beats every queue entry."""
    pos = torch.einsum('bd,bld->bl', q_local, k_local) / tau     # B x L
    neg = (q_local @ queue) / tau                                # B x K
    # log Σ exp over [pos_j, neg] without materialising B·L·(1+K) logits.
    neg_lse = torch.logsumexp(neg, 1, keepdim=True)              # B x 1
    inter = (torch.logaddexp(pos, neg_lse) - pos).mean()
    pos_own = pos.roll(-QUERY_SEGMENT, 1)   # the query's own segment first: intra's positive
    intra_rows = torch.stack([pos_own[:, :1].expand_as(pos_own[:, 1:]), pos_own[:, 1:]], -1)
    intra = (torch.logsumexp(intra_rows, -1) - intra_rows[..., 0]).mean()
    inter_top1 = (pos > neg.max(1, keepdim=True).values).float().mean()
    return inter, intra, inter_top1


def multi_positive_nce(logits, pos_mask):
    """CoCLR's loss ``-log Σ_{positives} softmax(logits)``, averaged over rows; ``pos_mask`` is
    bool ``[B, 1+K]`` like ``logits``, with at least one positive per row."""
    masked = logits.masked_fill(~pos_mask, float('-inf'))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(masked, 1)).mean()


def coclr_positive_mask(sampler_emb, queue_second, source, queue_source, topk, mask_self):
    """``(mask, topk_index)``: CoCLR's positives ``[B, 1+K]`` (bool; column 0 the key itself,
    then the queue's siblings and mined entries) and ``[B, topk]`` (None when ``topk`` is 0);
    ``mask_self`` drops the self positive where others exist (docs/METHOD.md, CVTCL)."""
    siblings = source[:, None] == queue_source[None, :]          # B x K
    mask_queue = siblings.clone()
    topk_index = None
    if topk > 0:
        sim = (sampler_emb @ queue_second).masked_fill(siblings, float('-inf'))   # B x K
        topk_index = sim.topk(topk, dim=1).indices                # B x topk
        mask_queue.scatter_(1, topk_index, True)
    self_col = ~(mask_queue.any(1, keepdim=True) & mask_self)
    return torch.cat([self_col, mask_queue], 1), topk_index
