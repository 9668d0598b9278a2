"""A small 3D CNN for the demo configs only (README, The demo), about a tenth of S3D's work:
four 3x3x3 convolutions (BatchNorm, ReLU), each halving H and W, the last two T too."""
from torch import nn


class Small3D(nn.Sequential):   # [B, C, T, H, W] -> [B, 128, T/4, H/16, W/16]
    feature_dim = 128

    def __init__(self, in_channels=3):
        layers, c_in = [], in_channels
        for c_out, time_stride in ((16, 1), (32, 1), (64, 2), (128, 2)):
            layers += [nn.Conv3d(c_in, c_out, 3, stride=(time_stride, 2, 2), padding=1,
                                 bias=False), nn.BatchNorm3d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        super().__init__(*layers)
