"""The MoCo core and the two pretraining models (docs/METHOD.md, Model and Losses).

``LocalInfoNCE`` (``local_nce.py``): global InfoNCE between two views plus the inter
(local-to-global) and intra (temporal order) losses between local clips.
``LocalCoCLR`` (``local_coclr.py``): CVTCL, the same with CoCLR's multi-positive loss whose extra
positives are mined by a frozen ``sampler`` of the other modality.

``forward`` returns ``(loss, stats)``: the weighted total of the terms and detached scalars
(``loss_<term>``, ``top1``, ``top5``, ``inter_top1``, CoCLR's ``mining_acc``).
State-dict keys equal CoCLR's (``encoder_q.*``, ``encoder_k.*``, ``queue``, ``queue_ptr``, and
``sampler.*``, ``queue_second``, ``queue_vname``, ``queue_label``): its checkpoints load strictly.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import build_backbone
from utils import distributed as du
from utils.misc import UserError, topk_accuracy
from . import losses


class Encoder(nn.Sequential):
    """backbone -> global average pool -> 1x1x1 conv (F->F) -> ReLU -> 1x1x1 conv (F->D).

    ``[B, C, T, H, W]`` -> ``[B, D]``, L2-normalised. Keys ``0.<backbone>``, ``2.*``, ``4.*``
    as CoCLR's."""

    def __init__(self, net, dim):
        backbone = build_backbone(net)
        f = backbone.feature_dim
        super().__init__(backbone, nn.AdaptiveAvgPool3d(1), nn.Conv3d(f, f, 1), nn.ReLU(inplace=True),
                         nn.Conv3d(f, dim, 1))

    def forward(self, x):
        return F.normalize(super().forward(x).flatten(1), dim=1)


def split_segments(x, num_segments):
    """``[B, C, T, H, W]`` -> ``[B*L, C, T/L, H, W]``: the L consecutive local segments."""
    b, c, t, h, w = x.shape
    if t % num_segments:
        raise UserError(f'--seq_len {t} is not divisible into {num_segments} local segments')
    s = t // num_segments
    return x.view(b, c, num_segments, s, h, w).transpose(1, 2).reshape(b * num_segments, c, s, h, w)


class MoCo(nn.Module):
    """Query encoder, momentum key encoder, queue and shuffle-BN (He et al., MoCo, CVPR 2020).

    dim: embedding size D; K: queue length; m: momentum; tau: temperature; num_segments: local
    clips L; bn_splits: groups of the shuffled key batch with their own BatchNorm statistics in
    one process; weights: loss term -> weight (``WEIGHTS`` when None).
    """
    WEIGHTS = {}

    def __init__(self, net='s3d', dim=128, K=2048, m=0.999, tau=0.07, num_segments=4,
                 bn_splits=1, weights=None):
        super().__init__()
        self.K, self.m, self.tau = K, m, tau
        self.num_segments, self.bn_splits = num_segments, bn_splits
        self.weights = dict(self.WEIGHTS if weights is None else weights)
        if set(self.weights) != set(self.WEIGHTS):
            raise ValueError(f'weights {sorted(self.weights)}: the terms are '
                             f'{sorted(self.WEIGHTS)}')
        self.encoder_q = Encoder(net, dim)
        self.encoder_k = Encoder(net, dim)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.encoder_k.requires_grad_(False)
        self.register_buffer('queue', F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))

    ready = True   # whether a batch may take a gradient step (CoCLR waits for a full queue)

    @torch.no_grad()
    def momentum_update(self):
        k = list(self.encoder_k.parameters())
        torch._foreach_mul_(k, self.m)
        torch._foreach_add_(k, list(self.encoder_q.parameters()), alpha=1 - self.m)

    @torch.no_grad()
    def shuffled_keys(self, x):
        """Key embeddings of ``x`` with shuffle-BN, returned in the order of ``x``.

        Across processes (as MoCo): gather, shuffle with one permutation, each process encodes
        its slice. In each process the shuffled batch is also split into ``bn_splits`` groups
        with their own BatchNorm statistics, so one GPU or the CPU gets shuffle-BN too.
        """
        b = x.shape[0]
        rank = du.get_rank()
        x_all = du.all_gather(x)
        perm = du.broadcast(torch.randperm(x_all.shape[0], device=x.device))
        x_mine = x_all[perm[rank * b:(rank + 1) * b]]
        k = torch.cat([self.encoder_k(chunk) for chunk in x_mine.chunk(self.bn_splits)])
        k_all = du.all_gather(k) if du.world_size() > 1 else k
        return k_all[torch.argsort(perm)][rank * b:(rank + 1) * b]

    @torch.no_grad()
    def enqueue(self, keys, **extra_queues):
        """Write the keys of every process at ``queue_ptr`` (K is a multiple of the global batch),
        and the same slots of the ``extra_queues`` buffers. The pointer stays on the device."""
        keys = du.all_gather(keys)
        n = keys.shape[0]
        assert self.K % n == 0, 'checked at start-up: --moco-k must be a multiple of the global batch'
        slots = self.queue_ptr + torch.arange(n, device=keys.device)
        self.queue.index_copy_(1, slots, keys.T.to(self.queue.dtype))
        for name, values in extra_queues.items():
            buffer = getattr(self, name)
            buffer.index_copy_(buffer.dim() - 1, slots,
                               du.all_gather(values).movedim(0, -1).to(buffer.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.K)

    def embed(self, view1, view2, local1, local2):
        """q, k ``[B, D]`` (view 1 by the query encoder, view 2 by the key encoder), q_local
        ``[B, D]`` (``local1``, view 1's first local clip) and k_local ``[B, L, D]`` (``local2``,
        view 2's L local clips, encoded as one batch). Local clips left None are the segments of
        the global views (``--local_aug shared``). Returned in fp32."""
        b, L = view1.shape[0], self.num_segments
        local2 = split_segments(view2, L) if local2 is None else local2.flatten(0, 1)
        if local1 is None:
            local1 = view1[:, :, :view1.shape[2] // L]
        q, q_local = self.encoder_q(view1), self.encoder_q(local1)
        with torch.no_grad():
            self.momentum_update()
            k = self.shuffled_keys(view2)
            k_local = self.shuffled_keys(local2).unflatten(0, (b, -1))
        return q.float(), q_local.float(), k.float(), k_local.float()

    def objective(self, terms, logits, **extra):
        """``(loss, stats)``: the weighted sum of ``terms`` and the detached statistics."""
        loss = sum(self.weights[name] * value for name, value in terms.items())
        top1, top5 = topk_accuracy(logits, torch.zeros_like(logits[:, 0], dtype=torch.long))
        stats = {f'loss_{name}': value for name, value in terms.items()}
        stats.update(top1=top1, top5=top5, **extra)
        return loss, {name: value.detach() for name, value in stats.items()}


def fp32(like):
    """Autocast off: the losses (dot products / tau, log-sum-exp) run in fp32."""
    return torch.autocast(like.device.type, enabled=False)


class LocalInfoNCE(MoCo):
    """Local InfoNCE: global InfoNCE + inter + intra (docs/METHOD.md, Losses)."""
    WEIGHTS = {'global': 1.0, 'inter': 1 / 3, 'intra': 1.0}

    def forward(self, view1, view2, local1=None, local2=None):
        q, q_local, k, k_local = self.embed(view1, view2, local1, local2)
        queue = self.queue.clone()   # the queue changes below; backward needs this one
        with fp32(queue):
            logits = losses.global_logits(q, k, queue, self.tau)
            inter, intra, inter_top1 = losses.local_losses(q_local, k_local, queue, self.tau)
            terms = {'global': losses.info_nce(logits), 'inter': inter, 'intra': intra}
        self.enqueue(k)
        return self.objective(terms, logits, inter_top1=inter_top1)


class LocalCoCLR(MoCo):
    """CVTCL: CoCLR's multi-positive loss + inter + intra (docs/METHOD.md, CVTCL).

    topk: positives mined per row by the sampler once the queue is full; self_mask_prob:
    probability that a batch drops the self positive where other positives exist.
    ``queue_second`` holds the sampler's embeddings, ``queue_vname`` source-group ids (-1: empty
    slot) and ``queue_label`` class labels (-1: unknown, for the mining accuracy).
    """
    WEIGHTS = {'coclr': 1 / 3, 'inter': 1 / 3, 'intra': 1 / 3}

    def __init__(self, net='s3d', dim=128, K=2048, m=0.999, tau=0.07, num_segments=4,
                 bn_splits=1, weights=None, topk=5, self_mask_prob=0.9):
        super().__init__(net, dim, K, m, tau, num_segments, bn_splits, weights)
        self.topk, self.self_mask_prob = topk, self_mask_prob
        self.sampler = Encoder(net, dim)
        self.sampler.requires_grad_(False)
        self.register_buffer('queue_second', F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer('queue_vname', torch.full((K,), -1, dtype=torch.long))
        self.register_buffer('queue_label', torch.full((K,), -1, dtype=torch.long))

    def train(self, mode=True):
        super().train(mode)
        self.sampler.eval()   # frozen, always with its running BatchNorm statistics
        return self

    @property
    def ready(self):
        return bool((self.queue_vname >= 0).all())

    def forward(self, view1, view2, other_view2, source, label, local1=None, local2=None):
        mine = self.ready and self.topk > 0
        mask_self = bool(torch.rand(()) < self.self_mask_prob)
        q, q_local, k, k_local = self.embed(view1, view2, local1, local2)
        with torch.no_grad():
            s = self.sampler(other_view2).float()
        queue = self.queue.clone()   # the queue changes below; backward needs this one
        with fp32(queue):
            logits = losses.global_logits(q, k, queue, self.tau)
            mask, topk_index = losses.coclr_positive_mask(
                s, self.queue_second, source, self.queue_vname, self.topk if mine else 0,
                mask_self)
            inter, intra, inter_top1 = losses.local_losses(q_local, k_local, queue, self.tau)
            terms = {'coclr': losses.multi_positive_nce(logits, mask), 'inter': inter,
                     'intra': intra}
        extra = {'inter_top1': inter_top1}
        if topk_index is not None:
            mined, label_ = self.queue_label[topk_index], label[:, None]
            known = (mined >= 0) & (label_ >= 0)
            extra['mining_acc'] = ((mined == label_) & known).sum() / known.sum().clamp(min=1)
        self.enqueue(k, queue_second=s, queue_vname=source, queue_label=label)
        return self.objective(terms, logits, **extra)
