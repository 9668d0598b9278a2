"""Video backbones with CoCLR-compatible state-dict keys.

``build_backbone(name, in_channels)`` returns a module mapping [B, C, T, H, W] to the final
feature map [B, F, T', H', W'] (no pooling, no head); ``module.feature_dim`` is F.
"""

from torch import nn

from .r50 import ResNet2d3d
from .s3d import S3D

BACKBONES = ("s3d", "s3dg", "r50")


def build_backbone(name: str, in_channels: int = 3) -> nn.Module:
    """Build backbone ``name`` (one of BACKBONES) for inputs with ``in_channels`` channels
    (3 for RGB, 2 for optical flow)."""
    if name == "s3d":
        return S3D(in_channels, gating=False)
    if name == "s3dg":
        return S3D(in_channels, gating=True)
    if name == "r50":
        return ResNet2d3d(in_channels)
    raise ValueError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")


__all__ = ["BACKBONES", "build_backbone", "S3D", "ResNet2d3d"]


# Shortest local segment each backbone can encode: S3D halves time three times.
MIN_SEGMENT_FRAMES = {'s3d': 8, 's3dg': 8, 'r50': 1}
