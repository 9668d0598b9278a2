"""Video backbones with CoCLR's state-dict keys (docs/METHOD.md, Model).

``BACKBONES[name](in_channels)``: ``[B, C, T, H, W]`` -> last feature map ``[B, F, T', H', W']``
(no pooling, no head), F = ``module.feature_dim``. A new backbone is one more entry.
"""
from functools import partial

from utils.misc import UserError
from .r50 import ResNet2d3d
from .s3d import S3D
from .small3d import Small3D

BACKBONES = {'s3d': partial(S3D, gating=False), 's3dg': partial(S3D, gating=True),
             'r50': ResNet2d3d, 'small3d': Small3D}

# Shortest local segment each backbone can encode: S3D halves time three times, Small3D twice.
MIN_SEGMENT_FRAMES = {'s3d': 8, 's3dg': 8, 'r50': 1, 'small3d': 4}


def build_backbone(name, in_channels=3):
    if name not in BACKBONES:
        raise UserError(f'--net {name!r} is unknown; known: {", ".join(BACKBONES)}')
    return BACKBONES[name](in_channels)
