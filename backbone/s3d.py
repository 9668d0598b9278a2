"""S3D and S3D-G backbones (Xie et al., "Rethinking Spatiotemporal Feature Learning", ECCV 2018).

The layout is CoCLR's, so its checkpoints load with ``strict=True``. CoCLR registers every stage
twice: under its Inception name (``Conv_1a``, ``Mixed_3b``, ...) and inside a ``blockN``
``nn.Sequential`` with the max-pooling layers, so the state dict lists each tensor under both
names (``Conv_1a.conv1.weight`` is ``block1.0.conv1.weight``). ``forward`` runs the blocks.
Unlike the TensorFlow original, CoCLR uses PyTorch's default BatchNorm (eps 1e-5, momentum 0.1)
and symmetric max-pool padding; both matter for its weights, so they are kept.
"""
import torch
from torch import nn

# Channel plan of each separable Inception block:
# (branch0 1x1, branch1 1x1 -> sep3x3x3, branch2 1x1 -> sep3x3x3, branch3 pool -> 1x1).
_MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class Unit3d(nn.Module):
    """Conv3d (no bias) -> BatchNorm -> ReLU. Keys: ``conv``, ``bn``."""

    def __init__(self, in_planes, out_planes, kernel_size=1, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv3d(in_planes, out_planes, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm3d(out_planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


class SepConv3d(nn.Module):
    """(1,k,k) conv, BN, ReLU, then (k,1,1) conv, BN, ReLU; ``stride`` in time and space.
    Registered conv1, conv2, bn1, bn2: CoCLR's state-dict order."""

    def __init__(self, in_planes, out_planes, kernel_size, stride=1, padding=0):
        super().__init__()
        k, s, p = kernel_size, stride, padding
        self.conv1 = nn.Conv3d(in_planes, out_planes, (1, k, k), (1, s, s), (0, p, p), bias=False)
        self.conv2 = nn.Conv3d(out_planes, out_planes, (k, 1, 1), (s, 1, 1), (p, 0, 0), bias=False)
        self.bn1 = nn.BatchNorm3d(out_planes)
        self.bn2 = nn.BatchNorm3d(out_planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


class SelfGating(nn.Module):
    """S3D-G feature gating: x * sigmoid(W mean_{T,H,W}(x) + b), one weight per channel."""

    def __init__(self, channels):
        super().__init__()
        self.fc = nn.Linear(channels, channels)

    def forward(self, x):
        gate = torch.sigmoid(self.fc(x.mean(dim=(2, 3, 4))))  # B x C
        return x * gate[:, :, None, None, None]


class SepInception(nn.Module):
    """Inception block with separable 3x3x3 convolutions and optional self-gating per branch."""

    def __init__(self, in_planes, planes, gating=False):
        super().__init__()
        b0, b1_reduce, b1, b2_reduce, b2, b3 = planes
        self.branch0 = nn.Sequential(Unit3d(in_planes, b0))
        self.branch1 = nn.Sequential(Unit3d(in_planes, b1_reduce),
                                     SepConv3d(b1_reduce, b1, kernel_size=3, padding=1))
        self.branch2 = nn.Sequential(Unit3d(in_planes, b2_reduce),
                                     SepConv3d(b2_reduce, b2, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(nn.MaxPool3d(3, stride=1, padding=1),
                                     Unit3d(in_planes, b3))
        for i, channels in enumerate((b0, b1, b2, b3)):   # S3D-G's keys gating_b0 .. gating_b3
            setattr(self, f"gating_b{i}", SelfGating(channels) if gating else nn.Identity())

    def forward(self, x):
        branches = (self.branch0, self.branch1, self.branch2, self.branch3)
        return torch.cat([getattr(self, f"gating_b{i}")(b(x)) for i, b in enumerate(branches)], 1)


class S3D(nn.Module):
    """S3D or S3D-G (``gating``): ``[B, in_channels, T, H, W]`` -> ``[B, 1024, T/8, H/32, W/32]``
    (Conv_1a, MaxPool_4a and MaxPool_5a stride in time); no pooling or head."""
    feature_dim = 1024

    def __init__(self, in_channels=3, gating=False):
        super().__init__()
        # Attribute order fixes the state-dict order: each named stage is registered right
        # before the blockN container that reuses it, as in CoCLR.
        self.Conv_1a = SepConv3d(in_channels, 64, kernel_size=7, stride=2, padding=3)
        self.block1 = nn.Sequential(self.Conv_1a)

        self.MaxPool_2a = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.Conv_2b = Unit3d(64, 64)
        self.Conv_2c = SepConv3d(64, 192, kernel_size=3, padding=1)
        self.block2 = nn.Sequential(self.MaxPool_2a, self.Conv_2b, self.Conv_2c)

        self.MaxPool_3a = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        self.block3 = self._stage(self.MaxPool_3a, ["Mixed_3b", "Mixed_3c"], gating)

        self.MaxPool_4a = nn.MaxPool3d(3, stride=2, padding=1)
        self.block4 = self._stage(
            self.MaxPool_4a, ["Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"], gating)

        self.MaxPool_5a = nn.MaxPool3d(2, stride=2)
        self.block5 = self._stage(self.MaxPool_5a, ["Mixed_5b", "Mixed_5c"], gating)
        # CoCLR's initialisation: N(0, 0.01) convolutions (the original S3D uses a truncated
        # normal); BatchNorm and the gating Linear layers keep PyTorch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.normal_(m.weight, mean=0.0, std=0.01)

    def _stage(self, pool, names, gating):   # each Mixed block under its own name, then in blockN
        for name in names:
            setattr(self, name, SepInception(*_MIXED[name], gating=gating))
        return nn.Sequential(pool, *(getattr(self, name) for name in names))

    def forward(self, x):
        return self.block5(self.block4(self.block3(self.block2(self.block1(x)))))
