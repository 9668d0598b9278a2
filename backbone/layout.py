"""3D layers that hand channels-last clips to the faster 2D kernels, with the same results.

A channels-last-3D clip ``[B, C, T, H, W]`` is stored as ``[B, T, H, W, C]``. Read as 4D
channels-last images, the same memory is ``[B*T, C, H, W]`` (frames) or ``[B, C, T, H*W]`` (time
by pixels), with no copy. S3D's layers are all separable: (1,k,k) and (k,1,1) convolutions,
pointwise convolutions, BatchNorm, and max pooling (a max over a box is a max over its rows of a
max over its columns). On the GPU each of them can therefore run as a 2D operation over one of
these views (``use_2d_kernels``). PyTorch's 3D channels-last kernels are much slower there
(bench/RESULTS.md, H100 profile): its BatchNorm computes 3D channels-last statistics with a
generic reduction, its 3D max pooling has no channels-last kernel (it runs the contiguous-layout
kernel), and cuDNN picks a generic kernel for some 3D convolutions.

The subclasses keep the parameters, buffers and state-dict keys of ``nn.Conv3d``,
``nn.BatchNorm3d`` and ``nn.MaxPool3d``; any other input (contiguous, or on the CPU, whose 3D
kernels are fine) takes the parent's path. Max pooling through views scans each window in the
same order as the 3D kernel, so it routes gradients to the same maximum (tested on the CPU).
"""
import torch
import torch.nn.functional as F
from torch import nn


def use_planes(x):
    """Whether ``x`` can take the 2D path: a channels-last-3D clip on the GPU."""
    return x.is_cuda and x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def use_2d_kernels(module, enabled=True):
    """Let the layout layers of ``module`` take the 2D path (off by default).

    Worth it when the training step is replayed from a CUDA graph: on an H100 the S3D step's GPU
    time falls from 148 to 112 ms. Run eagerly, the few view operations each layer adds cost more
    host time than the kernels save (a host-bound 239 ms step against 156 ms), so eager steps,
    evaluation and the CPU keep PyTorch's 3D layers."""
    for m in module.modules():
        if isinstance(m, (Conv3d, BatchNorm3d, MaxPool3d)):
            m.planes = enabled


def as_frames(x):
    """``[B, C, T, H, W]`` channels-last-3D -> ``[B*T, C, H, W]`` channels-last (a view)."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def from_frames(y, b):
    """Inverse of :func:`as_frames` for a result ``[B*T, C', H', W']``."""
    n, c, h, w = y.shape
    return y.view(b, n // b, c, h, w).transpose(1, 2)


def as_time(x):
    """``[B, C, T, H, W]`` channels-last-3D -> ``[B, C, T, H*W]`` channels-last (a view)."""
    b, c, t, h, w = x.shape
    return x.reshape(b, c, t, h * w)


def conv3d_planes(x, weight, bias, stride, padding):
    """``F.conv3d`` for a (1,k,k) kernel with no temporal stride or padding (2D over frames),
    or a (k,1,1) kernel with no spatial stride or padding (2D over time); None otherwise."""
    kt, kh, kw = weight.shape[2:]
    if kt == 1 and stride[0] == 1 and padding[0] == 0:
        y = F.conv2d(as_frames(x), weight.squeeze(2), bias, stride[1:], padding[1:])
        return from_frames(y, x.shape[0])
    if kh == kw == 1 and stride[1:] == (1, 1) and padding[1:] == (0, 0):
        b, _, _, h, w = x.shape
        y = F.conv2d(as_time(x), weight.squeeze(-1), bias, (stride[0], 1), (padding[0], 0))
        return y.view(b, y.shape[1], y.shape[2], h, w)
    return None


def max_pool3d_planes(x, kernel, stride, padding):
    """``F.max_pool3d`` as a spatial then a temporal 2D max pooling."""
    (kt, kh, kw), (st, sh, sw), (pt, ph, pw) = kernel, stride, padding
    b = x.shape[0]
    if (kh, kw, sh, sw) != (1, 1, 1, 1):
        x = from_frames(F.max_pool2d(as_frames(x), (kh, kw), (sh, sw), (ph, pw)), b)
    if (kt, st) != (1, 1):
        _, c, _, h, w = x.shape
        y = F.max_pool2d(as_time(x), (kt, 1), (st, 1), (pt, 0))
        x = y.view(b, c, y.shape[2], h, w)
    return x


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


class _Planes:
    """``forward``: ``forward_planes`` when enabled (``use_2d_kernels``) for a channels-last
    GPU clip, else the ``nn`` layer's own."""
    planes = False

    def forward(self, x):
        if self.planes and use_planes(x):
            return self.forward_planes(x)
        return super().forward(x)


def pad_channels(x, weight, multiple):
    """``x`` ``[B, C, T, H, W]`` (channels-last-3D) and ``weight`` ``[O, C, ...]`` with zero
    channels added up to a multiple of ``multiple``: the same convolution."""
    b, c, t, h, w = x.shape
    extra = -c % multiple
    if not extra:
        return x, weight
    padded = x.new_zeros(b, t, h, w, c + extra)
    padded[..., :c] = x.permute(0, 2, 3, 4, 1)
    return padded.permute(0, 4, 1, 2, 3), F.pad(weight, (0, 0) * (weight.dim() - 2) + (0, extra))


class Conv3d(_Planes, nn.Conv3d):
    # Pad the input channels to a multiple of this in the 2D path (0: never). cuDNN's
    # channels-last tensor-core kernels want channels in multiples of 8; S3D's first
    # convolution sees the 3 channels of a clip: 11 of the step's 112 ms of GPU time on an
    # H100 (bench/RESULTS.md, run 2 profile). Off until measured (bench/train_step.py,
    # path fast-graph-pad8).
    pad_channels = 0

    def forward_planes(self, x):
        if self.groups == 1 and self.dilation == (1, 1, 1) and self.padding_mode == 'zeros' \
                and isinstance(self.padding, tuple):
            xp, weight = x, self.weight
            if self.pad_channels:
                xp, weight = pad_channels(x, weight, self.pad_channels)
            y = conv3d_planes(xp, weight, self.bias, self.stride, self.padding)
            if y is not None:
                return y
        return nn.Conv3d.forward(self, x)


class BatchNorm3d(_Planes, nn.BatchNorm3d):
    def forward_planes(self, x):
        """The same statistics (over B, T, H, W) through the ``[B, C, T*H, W]`` view."""
        b, c, t, h, w = x.shape
        return nn.BatchNorm3d.forward(self, x.view(b, c, t * h, w)).view(b, c, t, h, w)

    def _check_input_dim(self, input):
        if input.dim() not in (4, 5):   # 4: the view of forward_planes
            raise ValueError(f'expected a 5D input (got {input.dim()}D input)')


class MaxPool3d(_Planes, nn.MaxPool3d):
    def forward_planes(self, x):
        if self.ceil_mode or self.return_indices or _triple(self.dilation) != (1, 1, 1):
            return nn.MaxPool3d.forward(self, x)
        return max_pool3d_planes(x, _triple(self.kernel_size), _triple(self.stride),
                                 _triple(self.padding))
