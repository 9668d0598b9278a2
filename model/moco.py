"""The MoCo core and the two pretraining models, ``LocalInfoNCE`` (``local_nce.py``) and
``LocalCoCLR`` (``local_coclr.py``) (docs/METHOD.md, Model, Losses and CVTCL). ``forward``
returns ``(loss, stats)``: the weighted total and detached scalars (``loss_<term>``, ``top1``,
``top5``, ``inter_top1``, CoCLR's ``mining_acc``). State-dict keys equal CoCLR's."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import build_backbone
from dataset.video_dataset import QUERY_SEGMENT
from utils import distributed as du
from utils.misc import topk_accuracy
from . import losses


class Encoder(nn.Sequential):
    """backbone -> average pool -> 1x1x1 conv (F->F) -> ReLU -> 1x1x1 conv (F->D), L2-normalised:
    ``[B, C, T, H, W]`` -> ``[B, D]``. Keys ``0.<backbone>``, ``2.*``, ``4.*``."""

    def __init__(self, net, dim):
        backbone = build_backbone(net)
        f = backbone.feature_dim
        super().__init__(backbone, nn.AdaptiveAvgPool3d(1), nn.Conv3d(f, f, 1),
                         nn.ReLU(inplace=True), nn.Conv3d(f, dim, 1))

    def forward(self, x):
        return F.normalize(super().forward(x).flatten(1), dim=1)


def split_segments(x, num_segments):
    """``[B, C, T, H, W]`` -> ``[B*L, C, T/L, H, W]``: the L consecutive local segments."""
    return x.unflatten(2, (num_segments, -1)).transpose(1, 2).flatten(0, 1)


class MoCo(nn.Module):
    """Query encoder, momentum key encoder, queue ``[D, K]`` and shuffle-BN (He et al., MoCo).
    m: momentum; tau: temperature; num_segments: local clips L; bn_splits: BatchNorm groups of
    the shuffled key batch in one process; weights: loss term -> weight (default ``WEIGHTS``);
    local_keys: 'per_segment' (a shuffled batch of B per local clip index) or 'one_batch'."""
    WEIGHTS = {}
    ready = True   # whether a batch may take a gradient step (CoCLR waits for a full queue)

    def __init__(self, net='s3d', dim=128, K=2048, m=0.999, tau=0.07, num_segments=4,
                 bn_splits=1, weights=None, local_keys='per_segment'):
        super().__init__()
        self.K, self.m, self.tau = K, m, tau
        self.num_segments, self.bn_splits, self.local_keys = num_segments, bn_splits, local_keys
        self.weights = dict(self.WEIGHTS if weights is None else weights)
        self.encoder_q = Encoder(net, dim)
        self.encoder_k = Encoder(net, dim)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.encoder_k.requires_grad_(False)
        self.register_buffer('queue', F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def momentum_update(self):
        k = list(self.encoder_k.parameters())
        torch._foreach_mul_(k, self.m)
        torch._foreach_add_(k, list(self.encoder_q.parameters()), alpha=1 - self.m)

    @torch.no_grad()
    def shuffled_keys(self, x):
        """Key embeddings ``[B, D]`` of ``x`` with shuffle-BN, in the order of ``x``, each process's
        slice in ``bn_splits`` groups (docs/METHOD.md, Model). The permutation is drawn on the
        device, so a CUDA graph's replays draw anew."""
        b = x.shape[0]
        rank = du.get_rank()
        x_all = du.all_gather(x)
        perm = du.broadcast(torch.randperm(x_all.shape[0], device=x.device))
        x_mine = x_all[perm[rank * b:(rank + 1) * b]]
        k = torch.cat([self.encoder_k(chunk) for chunk in x_mine.chunk(self.bn_splits)])
        return du.all_gather(k)[torch.argsort(perm)][rank * b:(rank + 1) * b]

    @torch.no_grad()
    def enqueue(self, keys, **extra_queues):
        """Write the keys ``[B, D]`` of every process at ``queue_ptr`` (kept on the device), and
        the same slots of the ``extra_queues`` buffers."""
        n = keys.shape[0] * du.world_size()   # K is a multiple of n (engine.check_args)
        slots = self.queue_ptr + torch.arange(n, device=keys.device)
        for name, values in {'queue': keys, **extra_queues}.items():
            buffer = getattr(self, name)   # the queue index last
            buffer.index_copy_(buffer.dim() - 1, slots,
                               du.all_gather(values).movedim(0, -1).to(buffer.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.K)

    def embed(self, view1, view2, local1, local2):
        """fp32 ``(q, q_local, k, k_local)``, ``[B, D]`` each but k_local ``[B, L, D]``: view 1,
        ``local1`` (view 1's query clip), view 2 and ``local2`` (its L local clips, keys).
        Local clips left None are cut from the views (``--local_aug shared``)."""
        b, L = view1.shape[0], self.num_segments
        local2 = split_segments(view2, L).unflatten(0, (b, L)) if local2 is None else local2
        if local1 is None:
            local1 = view1.unflatten(2, (L, -1))[:, :, QUERY_SEGMENT]
        q, q_local = self.encoder_q(view1), self.encoder_q(local1)
        with torch.no_grad():
            self.momentum_update()
            k = self.shuffled_keys(view2)
            if self.local_keys == 'one_batch':
                k_local = self.shuffled_keys(local2.flatten(0, 1)).unflatten(0, (b, L))
            else:   # BatchNorm statistics of one temporal position, as the authors
                k_local = torch.stack([self.shuffled_keys(local2[:, j]) for j in range(L)], 1)
        return q.float(), q_local.float(), k.float(), k_local.float()

    def objective(self, terms, logits, **extra):
        """``(loss, stats)``: the weighted sum of ``terms`` and the detached statistics."""
        loss = sum(self.weights[name] * value for name, value in terms.items())
        top1, top5 = topk_accuracy(logits, torch.zeros_like(logits[:, 0], dtype=torch.long))
        stats = {f'loss_{name}': value for name, value in terms.items()}
        stats.update(top1=top1, top5=top5, **extra)
        return loss, {name: value.detach() for name, value in stats.items()}


class LocalInfoNCE(MoCo):
    """Local InfoNCE: global InfoNCE + inter + intra (docs/METHOD.md, Losses)."""
    WEIGHTS = {'global': 1.0, 'inter': 1 / 3, 'intra': 1.0}

    def forward(self, view1, view2, local1=None, local2=None):
        q, q_local, k, k_local = self.embed(view1, view2, local1, local2)
        queue = self.queue.clone()   # enqueue changes the queue; backward needs this one
        with torch.autocast(q.device.type, enabled=False):   # the losses run in fp32
            logits = losses.global_logits(q, k, queue, self.tau)               # B x 1+K
            inter, intra, inter_top1 = losses.local_losses(q_local, k_local, queue, self.tau)
            terms = {'global': losses.info_nce(logits), 'inter': inter, 'intra': intra}
        self.enqueue(k)
        return self.objective(terms, logits, inter_top1=inter_top1)


class LocalCoCLR(MoCo):
    """CVTCL: CoCLR's multi-positive loss + inter + intra (docs/METHOD.md, CVTCL). topk:
    positives mined per row once the queue is full; self_mask_prob: probability that a batch
    drops the self positive (drawn on the device, no host branch: a CUDA graph's replays draw
    anew). Queues beside ``queue``: the sampler's embeddings, source ids (-1: empty slot) and
    class labels (-1: unknown)."""
    WEIGHTS = {'coclr': 1 / 3, 'inter': 1 / 3, 'intra': 1 / 3}

    def __init__(self, net='s3d', dim=128, *args, topk=5, self_mask_prob=0.9, **kwargs):
        super().__init__(net, dim, *args, **kwargs)
        self.topk, self.self_mask_prob = topk, self_mask_prob
        self.sampler = Encoder(net, dim)
        self.sampler.requires_grad_(False)
        self.register_buffer('queue_second', F.normalize(torch.randn(dim, self.K), dim=0))
        self.register_buffer('queue_vname', torch.full((self.K,), -1, dtype=torch.long))
        self.register_buffer('queue_label', torch.full((self.K,), -1, dtype=torch.long))
        self.queue_full = False   # once full, the queue stays full: no host read in the step
        self.register_load_state_dict_post_hook(LocalCoCLR.reread_queue)

    def train(self, mode=True):
        super().train(mode)
        self.sampler.eval()   # frozen, always with its running BatchNorm statistics
        return self

    def reread_queue(self, incompatible_keys):   # a loaded queue may be empty again
        self.queue_full = False

    @property
    def ready(self):
        if not self.queue_full:
            self.queue_full = bool((self.queue_vname >= 0).all())
        return self.queue_full

    def forward(self, view1, view2, other_view2, source, label, local1=None, local2=None):
        topk = self.topk if self.ready else 0   # mine once the queue is full
        mask_self = torch.rand((), device=view1.device) < self.self_mask_prob   # a bool tensor
        q, q_local, k, k_local = self.embed(view1, view2, local1, local2)
        with torch.no_grad():
            s = self.sampler(other_view2).float()                              # B x D
        queue = self.queue.clone()   # enqueue changes the queue; backward needs this one
        with torch.autocast(q.device.type, enabled=False):   # the losses run in fp32
            logits = losses.global_logits(q, k, queue, self.tau)               # B x 1+K
            mask, topk_index = losses.coclr_positive_mask(
                s, self.queue_second, source, self.queue_vname, topk, mask_self)
            inter, intra, inter_top1 = losses.local_losses(q_local, k_local, queue, self.tau)
            terms = {'coclr': losses.multi_positive_nce(logits, mask), 'inter': inter,
                     'intra': intra}
        extra = {'inter_top1': inter_top1}
        if topk_index is not None:   # share of mined positives of the same class, where known
            mined, label_ = self.queue_label[topk_index], label[:, None]
            known = (mined >= 0) & (label_ >= 0)
            extra['mining_acc'] = ((mined == label_) & known).sum() / known.sum().clamp(min=1)
        self.enqueue(k, queue_second=s, queue_vname=source, queue_label=label)
        return self.objective(terms, logits, **extra)
