"""ResNet-50 "2D-3D" backbone of the CoCLR code base (the CVRL-style R50).

The stem is a (5,7,7) 3D convolution with stride 2 in time and space (the only temporal
downsampling); stages 1-2 use spatial bottlenecks, stages 3-4 inflate each bottleneck's first
1x1 convolution to (3,1,1). Keys and order follow CoCLR so its checkpoints load with
``strict=True``; BatchNorm uses PyTorch's defaults, as CoCLR does.
"""
from torch import nn


class Bottleneck(nn.Module):
    """1x1 (3x1x1 if ``temporal``) -> 1x3x3 (spatial stride) -> 1x1 (x4 channels), + shortcut."""

    def __init__(self, in_planes, planes, stride=1, temporal=False):
        super().__init__()
        out_planes = planes * 4
        kt = 3 if temporal else 1
        self.conv1 = nn.Conv3d(in_planes, planes, (kt, 1, 1), padding=(kt // 2, 0, 0), bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, (1, 3, 3), stride=(1, stride, stride),
                               padding=(0, 1, 1), bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3 = nn.Conv3d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out_planes:   # keys downsample.{0,1}, as CoCLR's
            self.downsample = nn.Sequential(
                nn.Conv3d(in_planes, out_planes, 1, stride=(1, stride, stride), bias=False),
                nn.BatchNorm3d(out_planes))

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # CoCLR drops the ReLU of the very last block and applies F.relu after layer4
        # instead; that is the same function, so every block ends with its ReLU here.
        return self.relu(out + shortcut)


class ResNet2d3d(nn.Module):
    """``[B, in_channels, T, H, W]`` -> ``[B, 2048, T/2, H/32, W/32]``; no pooling or head."""
    feature_dim = 2048

    def __init__(self, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, 64, (5, 7, 7), stride=2, padding=(2, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))
        in_planes = 64
        # (bottlenecks, temporal conv1) per stage
        for i, (blocks, temporal) in enumerate([(3, False), (4, False), (6, True), (3, True)]):
            stage = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(Bottleneck(in_planes, 64 * 2 ** i, stride, temporal))
                in_planes = stage[-1].conv3.out_channels
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        # CoCLR's initialisation: He (fan_out) convolutions; BatchNorm keeps PyTorch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))
