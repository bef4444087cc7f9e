"""Dilated ResNet-50/101 with the PSPNet deep stem ("_v2", PFENet/BAM/UMTFSS) or torchvision's stem.

Parameter names follow the checkpoints: semseg/PFENet ``initmodel/resnet50_v2.pth`` (deep stem ``conv1, bn1,
conv2, bn2, conv3, bn3`` = 3x3 convs 3->64 (stride 2), 64->64, 64->128) and torchvision ``resnet50-*.pth``
(``conv1`` 7x7, ``bn1``); both then ``layer1..layer4`` of torchvision's Bottleneck (stride on the 3x3 conv).
"""
import torch
import torch.nn as nn
from torchvision.models import resnet as tv

from .base import Backbone
from .registry import register_backbone

DEPTHS = {50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}
DILATIONS = {8: (1, 2, 4), 16: (1, 1, 2), 32: (1, 1, 1)}  # layer2, layer3, layer4


def _conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class _BottleneckNoLastRelu(tv.Bottleneck):
    """The last block of layer4 without its final ReLU (PPNet/DPCL ``lastRelu=False``: signed layer4)."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out)) + identity


class ResNet(Backbone):
    """layer0 = stem + maxpool (stride 4: 128 channels deep stem, 64 torchvision), layer1 256 (stride 4),
    layer2 512 (8), layer3 1024 and layer4 2048 (8 each at output stride 8).

    Args:
        depth: 50 or 101.
        deep_stem: PSPNet's three 3x3 convs (True) or torchvision's 7x7 conv (False).
        output_stride: 8 (layer3 dilation 2, layer4 dilation 4), 16 (layer4 dilation 2) or 32.
        dilation: "pspnet" (semseg/PFENet: every block of a dilated layer has the new dilation, the first
            block's stride and its downsample's stride set to 1) or "torchvision"
            (``replace_stride_with_dilation``: the first block keeps the previous dilation; PPNet/DPCL, CRCNet).
        last_relu: False drops the ReLU after the last block of layer4 (DPCL via PPNet).
    """

    def __init__(self, depth=50, deep_stem=True, output_stride=8, frozen_bn=True, dilation="pspnet",
                 last_relu=True):
        super().__init__(frozen_bn)
        if output_stride not in DILATIONS:
            raise ValueError(f"ResNet: output_stride must be one of {sorted(DILATIONS)}, got {output_stride}")
        if dilation not in ("pspnet", "torchvision"):
            raise ValueError(f"ResNet: dilation must be 'pspnet' or 'torchvision', got {dilation!r}")
        net = tv.ResNet(tv.Bottleneck, DEPTHS[depth])
        self.deep_stem = deep_stem
        if deep_stem:
            self.conv1, self.bn1 = _conv3x3(3, 64, 2), nn.BatchNorm2d(64)
            self.conv2, self.bn2 = _conv3x3(64, 64), nn.BatchNorm2d(64)
            self.conv3, self.bn3 = _conv3x3(64, 128), nn.BatchNorm2d(128)
            net.inplanes = 128  # layer1 takes the deep stem's 128 channels
            net.layer1 = net._make_layer(tv.Bottleneck, 64, DEPTHS[depth][0])
        else:
            self.conv1, self.bn1 = net.conv1, net.bn1
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        previous = 1
        for layer, d in zip((self.layer2, self.layer3, self.layer4), DILATIONS[output_stride]):
            if d > 1:
                _dilate(layer, d, previous if dilation == "torchvision" else d)
            previous = d
        if not last_relu:
            self.layer4[-1].__class__ = _BottleneckNoLastRelu
        if deep_stem:  # torchvision's init for the modules built here (tv.ResNet initialised the rest)
            for m in [self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3, *self.layer1.modules()]:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        stem = 128 if deep_stem else 64
        self.channels = {"layer0": stem, "layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
        d2, d3, d4 = DILATIONS[output_stride]
        self.strides = {"layer0": 4, "layer1": 4, "layer2": 8, "layer3": 16 // d3, "layer4": 32 // d4}
        self.finish_init()

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.deep_stem:
            x = self.relu(self.bn2(self.conv2(x)))
            x = self.relu(self.bn3(self.conv3(x)))
        return self.maxpool(x)

    def stages(self):
        return [("layer0", self.stem), ("layer1", self.layer1), ("layer2", self.layer2),
                ("layer3", self.layer3), ("layer4", self.layer4)]


def _dilate(layer: nn.Sequential, d: int, first: int):
    """Stride 2 -> 1 and dilation ``d`` on every 3x3 conv of ``layer`` (``first`` on its first block)."""
    for i, block in enumerate(layer):
        di = first if i == 0 else d
        block.conv2.stride, block.conv2.dilation, block.conv2.padding = (1, 1), (di, di), (di, di)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)


def _builder(depth, deep_stem):
    def build(output_stride=None, frozen_bn=True, **kw):
        return ResNet(depth, deep_stem, 8 if output_stride is None else output_stride, frozen_bn, **kw)
    return build


for _depth in DEPTHS:
    register_backbone(f"resnet{_depth}_v2")(_builder(_depth, True))
    register_backbone(f"resnet{_depth}")(_builder(_depth, False))
