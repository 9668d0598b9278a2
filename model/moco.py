"""The MoCo core and the two pretraining models of SPEC §4.

``LocalInfoNCE`` (``local_nce.py --model infonce``): global InfoNCE between two views plus the
inter (local-to-global) and intra (temporal order) losses between 8-frame segments.
``LocalCoCLR`` (``local_coclr.py --model coclr``): CVTCL, the same with CoCLR's multi-positive
loss whose extra positives are mined by a frozen ``sampler`` of the other modality.

State-dict keys equal CoCLR's: ``encoder_q.*``, ``encoder_k.*``, ``queue``, ``queue_ptr`` (and
``sampler.*``, ``queue_second``, ``queue_vname``, ``queue_label``), so released checkpoints load
with ``strict=True``.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from backbone import build_backbone
from utils import distributed as du
from . import losses


class Encoder(nn.Sequential):
    """backbone -> global average pool -> 1x1x1 conv (F->F) -> ReLU -> 1x1x1 conv (F->D).

    Output ``[B, D]``, L2-normalised. A Sequential so that keys read ``encoder_q.0.<backbone>``,
    ``encoder_q.2.*``, ``encoder_q.4.*`` as in CoCLR.
    """

    def __init__(self, net, dim, in_channels=3):
        backbone = build_backbone(net, in_channels=in_channels)
        f = backbone.feature_dim
        super().__init__(backbone, nn.AdaptiveAvgPool3d(1), nn.Conv3d(f, f, 1), nn.ReLU(inplace=True),
                         nn.Conv3d(f, dim, 1))

    def forward(self, x):                                        # x: B x C x T x H x W
        return F.normalize(super().forward(x).flatten(1), dim=1)  # B x D


def fp32(like):
    """Autocast off: the losses (dot products / tau, log-sum-exp) run in fp32."""
    return torch.autocast(like.device.type, enabled=False)


def split_segments(x, num_segments):
    """``[B, C, T, H, W]`` -> ``[B*L, C, T/L, H, W]``: the L consecutive local segments."""
    b, c, t, h, w = x.shape
    if t % num_segments:
        raise ValueError(f'--seq_len {t} is not divisible into {num_segments} local segments')
    s = t // num_segments
    return x.view(b, c, num_segments, s, h, w).transpose(1, 2).reshape(b * num_segments, c, s, h, w)


class MoCo(nn.Module):
    """Query encoder, momentum key encoder, queue and shuffle-BN (He et al., MoCo, CVPR 2020).

    dim: embedding size D (128); K: queue length (2048); m: momentum (0.999); tau: temperature
    (0.07); num_segments: local segments L (4); bn_splits: groups of the shuffled key batch whose
    BatchNorm statistics are computed separately in one process (shuffle-BN without DDP).
    """

    def __init__(self, net='s3d', dim=128, K=2048, m=0.999, tau=0.07, in_channels=3,
                 num_segments=4, bn_splits=1):
        super().__init__()
        self.K, self.m, self.tau = K, m, tau
        self.num_segments, self.bn_splits = num_segments, bn_splits
        self.encoder_q = Encoder(net, dim, in_channels)
        self.encoder_k = Encoder(net, dim, in_channels)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        self.encoder_k.requires_grad_(False)
        self.register_buffer('queue', F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer('queue_ptr', torch.zeros(1, dtype=torch.long))

    @property
    def ready(self):
        """Whether a batch may take a gradient step (CoCLR waits for a full queue)."""
        return True

    @torch.no_grad()
    def momentum_update(self):
        q = list(self.encoder_q.parameters())
        k = list(self.encoder_k.parameters())
        torch._foreach_mul_(k, self.m)
        torch._foreach_add_(k, q, alpha=1 - self.m)

    @torch.no_grad()
    def shuffled_keys(self, x):
        """Key embeddings of ``x`` with shuffle-BN; returned in the order of ``x``.

        Across processes (as MoCo): gather, shuffle with one permutation, each process encodes
        its slice. In each process the (shuffled) batch is also split into ``bn_splits`` groups
        with their own BatchNorm statistics, so one GPU or the CPU gets shuffle-BN too.
        """
        b = x.shape[0]
        world, rank = du.world_size(), du.get_rank()
        x_all = du.all_gather(x)
        perm = du.broadcast(torch.randperm(x_all.shape[0], device=x.device))
        x_mine = x_all[perm[rank * b:(rank + 1) * b]]
        k = torch.cat([self.encoder_k(chunk) for chunk in x_mine.chunk(self.bn_splits)])
        k_all = du.all_gather(k) if world > 1 else k
        return k_all[torch.argsort(perm)][rank * b:(rank + 1) * b]

    @torch.no_grad()
    def enqueue(self, keys, **extra_queues):
        """Write keys of every process at ``queue_ptr`` (K is a multiple of the global batch).

        The pointer is read and advanced on the device: a step never waits for the GPU, and the
        same kernels are right on every replay of a captured CUDA graph."""
        keys = du.all_gather(keys)
        n = keys.shape[0]
        assert self.K % n == 0, 'checked at start-up: --moco-k must be a multiple of the global batch'
        slots = self.queue_ptr + torch.arange(n, device=keys.device)     # never past K
        self.queue.index_copy_(1, slots, keys.T.to(self.queue.dtype))
        for name, values in extra_queues.items():
            buffer = getattr(self, name)
            buffer.index_copy_(buffer.dim() - 1, slots,
                               du.all_gather(values).movedim(0, -1).to(buffer.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % self.K)

    def embed(self, view1, view2):
        """q ``[B,D]`` (view 1), q_local ``[B,D]`` (segment 1 of view 1), k ``[B,D]`` (view 2),
        k_local ``[B,L,D]`` (the L segments of view 2, encoded in one batched call)."""
        b = view1.shape[0]
        q = self.encoder_q(view1)
        # The first segments are a strided view; a dense copy in the same memory format (clone)
        # lets the encoder's first layer take the same kernels as the other calls (on a GPU
        # the 2D path of backbone/layout.py needs dense channels-last input).
        q_local = self.encoder_q(split_segments(view1, self.num_segments)[::self.num_segments]
                                 .clone())
        with torch.no_grad():
            self.momentum_update()
            k = self.shuffled_keys(view2)
            k_local = self.shuffled_keys(split_segments(view2, self.num_segments))
        # Losses in fp32 whatever the autocast precision of the encoders.
        return q.float(), q_local.float(), k.float(), k_local.view(b, self.num_segments, -1).float()


class LocalInfoNCE(MoCo):
    """Local InfoNCE: global InfoNCE + inter + intra (SPEC §4)."""

    def forward(self, view1, view2, **_):
        q, q_local, k, k_local = self.embed(view1, view2)
        queue = self.queue.clone()
        with fp32(queue):
            logits = losses.global_logits(q, k, queue, self.tau)
            inter, intra, inter_top1 = losses.local_losses(q_local, k_local, queue, self.tau)
            out = {'global': losses.info_nce(logits), 'inter': inter, 'intra': intra}
        self.enqueue(k)
        return out, {'logits': logits.detach(), 'inter_top1': inter_top1.detach()}


class LocalCoCLR(MoCo):
    """CVTCL: CoCLR's cross-view multi-positive loss + inter + intra (SPEC §4).

    topk: positives mined per row by the sampler once the queue is full (5); self_mask_prob:
    probability that a batch drops the self positive where other positives exist (0.9).
    The queue of the sampler's embeddings is ``queue_second``; ``queue_vname`` holds source-group
    ids (-1: empty slot) and ``queue_label`` class labels (-1: unknown), for mining accuracy.
    """

    def __init__(self, *args, topk=5, self_mask_prob=0.9, sampler_in_channels=3, net='s3d',
                 dim=128, **kwargs):
        super().__init__(*args, net=net, dim=dim, **kwargs)
        self.topk, self.self_mask_prob = topk, self_mask_prob
        self.sampler = Encoder(net, dim, sampler_in_channels)
        self.sampler.requires_grad_(False)
        self.register_buffer('queue_second', F.normalize(torch.randn(dim, self.K), dim=0))
        self.register_buffer('queue_vname', torch.full((self.K,), -1, dtype=torch.long))
        self.register_buffer('queue_label', torch.full((self.K,), -1, dtype=torch.long))
        # Host copy of "the queue is full": once full it stays full, so the device is read only
        # until then. Forgotten whenever a state dict is loaded.
        self._host_full = False
        self.register_load_state_dict_post_hook(LocalCoCLR._forget_host_state)

    @staticmethod
    def _forget_host_state(module, incompatible_keys):
        module._host_full = False

    def train(self, mode=True):
        super().train(mode)
        self.sampler.eval()  # frozen, always with its running BatchNorm statistics
        return self

    @property
    def queue_full(self):
        return bool((self.queue_vname >= 0).all())

    @property
    def ready(self):
        self._host_full = self._host_full or self.queue_full
        return self._host_full

    def forward(self, view1, view2, other_view2, source, label=None, **_):
        full = self.ready   # host-cached: no device read per step once the queue is full
        q, q_local, k, k_local = self.embed(view1, view2)
        with torch.no_grad():
            s = self.sampler(other_view2)
        queue = self.queue.clone()
        # Drawn on the device (a graph replay draws anew); the same draw as before on the CPU.
        mask_self = torch.rand((), device=view1.device) < self.self_mask_prob
        with fp32(queue):
            s = s.float()
            logits = losses.global_logits(q, k, queue, self.tau)
            mask, topk_index = losses.coclr_positive_mask(
                s, self.queue_second, source, self.queue_vname, self.topk, full, mask_self)
            inter, intra, inter_top1 = losses.local_losses(q_local, k_local, queue, self.tau)
            coclr = losses.multi_positive_nce(logits, mask)
        stats = {'logits': logits.detach(), 'inter_top1': inter_top1.detach()}
        if topk_index is not None and label is not None:
            mined = self.queue_label[topk_index]
            known = (mined >= 0) & (label[:, None] >= 0)
            stats['mining_acc'] = ((mined == label[:, None]) & known).float().sum() / known.sum().clamp(min=1)
        if label is None:
            label = torch.full_like(source, -1)
        self.enqueue(k, queue_second=s, queue_vname=source, queue_label=label)
        out = {'coclr': coclr, 'inter': inter, 'intra': intra}
        return out, stats
