"""The losses (docs/METHOD.md, Losses) as small pure functions on L2-normalised embeddings.

Shapes: B batch, D embedding dim, K queue length, L local segments. ``queue`` is ``[D, K]``
(CoCLR's layout). Logits are dot products divided by the temperature ``tau``; the positive of
a plain InfoNCE row is at index 0.
"""
import torch
import torch.nn.functional as F


def global_logits(q, k, queue, tau):
    """``[B, 1+K]``: ``[q·k, q·queue] / tau`` (MoCo)."""
    pos = (q * k).sum(1, keepdim=True)                  # B x 1
    neg = q @ queue                                      # B x K
    return torch.cat([pos, neg], 1) / tau


def info_nce(logits):
    """Cross-entropy with the positive at index 0, averaged over rows."""
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


def local_losses(q_local, k_local, queue, tau):
    """Inter (local-to-global instance) and intra (temporal order) losses, sharing similarities.

    ``q_local``: ``[B, D]`` segment 1 of view 1 through the query encoder. ``k_local``:
    ``[B, L, D]`` the L segments of view 2 through the key encoder.

    - inter: for each segment j a row ``[q·k_j, q·queue]``; all B·L rows averaged;
    - intra: for j = 2..L a row ``[q·k_1, q·k_j]`` (positive: the same segment of the other view,
      negative: another segment of the same video); all B·(L-1) rows averaged.

    Returns ``(inter, intra, inter_top1)``; ``inter_top1`` is the share of inter rows whose
    positive beats every queue entry.
    """
    pos = torch.einsum('bd,bld->bl', q_local, k_local) / tau     # B x L
    neg = (q_local @ queue) / tau                                # B x K
    # log Σ exp over [pos_j, neg] without materialising B·L·(1+K) logits.
    neg_lse = torch.logsumexp(neg, 1, keepdim=True)              # B x 1
    inter = (torch.logaddexp(pos, neg_lse) - pos).mean()
    intra_rows = torch.stack([pos[:, :1].expand_as(pos[:, 1:]), pos[:, 1:]], -1)  # B x L-1 x 2
    intra = (torch.logsumexp(intra_rows, -1) - intra_rows[..., 0]).mean()
    inter_top1 = (pos > neg.max(1, keepdim=True).values).float().mean()
    return inter, intra, inter_top1


def multi_positive_nce(logits, pos_mask):
    """CoCLR's loss: ``-log Σ_{positives} softmax(logits)``, averaged over rows.

    ``logits``: ``[B, 1+K]`` (already divided by tau); ``pos_mask``: bool, same shape, with at
    least one positive per row.
    """
    masked = logits.masked_fill(~pos_mask, float('-inf'))
    return (torch.logsumexp(logits, 1) - torch.logsumexp(masked, 1)).mean()


def coclr_positive_mask(sampler_emb, queue_second, source, queue_source, topk, mask_self):
    """Positives ``[B, 1+K]`` (bool) for CoCLR's multi-positive loss (docs/METHOD.md, CVTCL).

    Column 0 is the key itself. In the queue: every entry of the same source group (siblings)
    and the ``topk`` entries most similar to row b in the sampler's (other modality's) space,
    siblings excluded from that ranking (``topk`` 0: none). With ``mask_self`` the self positive
    is dropped in rows that have another positive.
    Returns ``(mask, topk_index)``; ``topk_index`` is ``[B, topk]``, or None when ``topk`` is 0.
    """
    siblings = source[:, None] == queue_source[None, :]          # B x K
    mask_queue = siblings.clone()
    topk_index = None
    if topk > 0:
        sim = sampler_emb @ queue_second                          # B x K
        sim = sim.masked_fill(siblings, float('-inf'))
        topk_index = sim.topk(topk, dim=1).indices                # B x topk
        mask_queue.scatter_(1, topk_index, True)
    self_col = ~(mask_queue.any(1, keepdim=True) & mask_self)
    return torch.cat([self_col, mask_queue], 1), topk_index
