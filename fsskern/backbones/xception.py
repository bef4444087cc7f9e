"""Aligned Xception-65 (DeepLabV3+'s modified Xception), the encoder POPNet's paper builds on.

Module names and ``rep`` indices follow the public POPNet code's ``networks/deeplab_xception_synBN.py`` (the
Graphonomy lineage), so the backbone of its COCO-pretrained DeepLabV3+ checkpoint (``xception_features.*`` in
``deeplab_v3plus_v3.pth``) loads into this module with ``weights=PATH`` (weights.py strips the prefix and drops
the checkpoint's ASPP / decoder). Nothing is downloaded.

| layer  | modules                        | channels | stride (OS 16 / 8) |
|--------|--------------------------------|----------|--------------------|
| layer0 | conv1, bn1, conv2, bn2         | 64       | 2                  |
| layer1 | block1, block2.rep (low level) | 256      | 4                  |
| layer2 | block2 (its last conv + skip)  | 256      | 8                  |
| layer3 | block3 .. block19              | 728      | 16 / 8             |
| layer4 | block20, conv3 .. conv5        | 2048     | 16 / 8             |

The low-level map is block2's ``rep`` output before its stride-2 conv, as the code's decoder takes it. Kept from
the code because its weights were trained with them: a block that starts with a ReLU adds its skip to the ReLU'd
input (the code's in-place ReLU rewrites the input before the skip reads it); conv3-conv5 carry BN + ReLU after
both of their convolutions; and the input format: the code feeds BGR scaled to [-1, 1], so ``forward`` turns the
ImageNet-normalised RGB every fsskern backbone takes into that (``code_input=False`` skips it). One is fixed: the
code's 1x1 skip of block3 keeps stride 2 at output stride 8, where the block's own stride is 1 (a shape error
there); here it takes the block's. The code's checkpoint was trained at output stride 16: at 8 block3 has no
stride-2 conv, so the file's ``block3.rep.5.*`` are unexpected and the strict loader names them.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .base import LAYERS, Backbone
from .registry import register_backbone

# output stride -> (block3's stride, the middle flow's dilation, the exit flow's dilations)
STRIDES = {16: (2, 1, (1, 2)), 8: (1, 2, (2, 4))}


class SeparableConv(nn.Module):
    """3x3 depthwise conv + BN, 1x1 pointwise conv + BN (``relu``: a ReLU after each BN, conv3-conv5's form).
    Padding = dilation: the code's explicit symmetric padding, for a 3x3 kernel."""

    def __init__(self, cin, cout, stride=1, dilation=1, relu=False):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, stride, dilation, dilation, groups=cin, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(cin)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm2d(cout)
        self.relu = relu

    def forward(self, x):
        x = self.depthwise_bn(self.depthwise(x))
        x = F.relu(x) if self.relu else x
        x = self.pointwise_bn(self.pointwise(x))
        return F.relu(x) if self.relu else x


class Block(nn.Module):
    """Separable convs, each after a ReLU, plus a skip (1x1 conv + BN where the shape changes). ``reps`` convs at
    ``dilation``; ``grow_first``: the first conv changes the width, else the last of the ``reps``; a stride-2
    block ends with one more conv of stride 2 (``last_conv_apart``: kept out of ``rep`` as ``block2_lastconv``,
    so the low-level map before it can be read); ``is_last`` (block20) ends with one more conv at stride 1."""

    def __init__(self, cin, cout, reps, stride=1, dilation=1, start_with_relu=True, grow_first=True, is_last=False,
                 last_conv_apart=False):
        super().__init__()
        widths = [cin] + [cout if grow_first or i == reps - 1 else cin for i in range(reps)]
        rep = []
        for a, b in zip(widths, widths[1:]):
            rep += [nn.ReLU(), SeparableConv(a, b, dilation=dilation)]
        if not start_with_relu:
            rep = rep[1:]
        last = [nn.ReLU(), SeparableConv(cout, cout, stride=stride, dilation=dilation)] if stride != 1 else []
        if is_last:
            rep += [nn.ReLU(), SeparableConv(cout, cout, dilation=dilation)]
        if last_conv_apart:
            self.block2_lastconv = nn.Sequential(*last)
        else:
            rep += last
        self.rep = nn.Sequential(*rep)
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False) if cin != cout or stride != 1 else None
        self.skipbn = nn.BatchNorm2d(cout) if self.skip is not None else None
        self.start_with_relu = start_with_relu

    def shortcut(self, x):
        x = F.relu(x) if self.start_with_relu else x  # what the code's in-place ReLU leaves in the input
        return self.skipbn(self.skip(x)) if self.skip is not None else x

    def forward(self, x):
        y = self.rep(x)
        return (self.block2_lastconv(y) if hasattr(self, "block2_lastconv") else y) + self.shortcut(x)


class Xception65(Backbone):
    """Args: output_stride 16 (default) or 8; code_input: convert ImageNet-normalised RGB to the code's BGR in
    [-1, 1] first (its checkpoint's input; default)."""

    def __init__(self, output_stride=16, frozen_bn=True, code_input=True):
        super().__init__(frozen_bn)
        self.code_input = code_input
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if output_stride not in STRIDES:
            raise ValueError(f"xception65: output_stride must be 16 or 8, got {output_stride}")
        block3_stride, middle, (exit1, exit2) = STRIDES[output_stride]
        self.conv1 = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 64, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.block1 = Block(64, 128, 2, stride=2, start_with_relu=False)
        self.block2 = Block(128, 256, 2, stride=2, last_conv_apart=True)
        self.block3 = Block(256, 728, 2, stride=block3_stride)
        for i in range(4, 20):  # the middle flow: 16 identity blocks
            setattr(self, f"block{i}", Block(728, 728, 3, dilation=middle))
        self.block20 = Block(728, 1024, 2, dilation=exit1, grow_first=False, is_last=True)
        self.conv3 = SeparableConv(1024, 1536, dilation=exit2, relu=True)
        self.conv4 = SeparableConv(1536, 1536, dilation=exit2, relu=True)
        self.conv5 = SeparableConv(1536, 2048, dilation=exit2, relu=True)
        self.channels = {"layer0": 64, "layer1": 256, "layer2": 256, "layer3": 728, "layer4": 2048}
        self.strides = {"layer0": 2, "layer1": 4, "layer2": 8, "layer3": output_stride, "layer4": output_stride}
        self.finish_init()

    def forward(self, x: torch.Tensor, layers: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """As :meth:`Backbone.forward`, but every stage runs: layer2 is built from layer1 and block1's output."""
        wanted = self.check_layers(layers)
        if self.code_input:
            x = (x * self.std + self.mean).flip(1) * 2 - 1  # RGB in [0, 1] -> BGR in [-1, 1]
        out = {"layer0": F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))}
        x = self.block1(out["layer0"])
        out["layer1"] = self.block2.rep(x)
        # block2(x), split so that the map before its stride-2 conv (the low level) is kept
        out["layer2"] = self.block2.block2_lastconv(out["layer1"]) + self.block2.shortcut(x)
        x = out["layer2"]
        for i in range(3, 20):
            x = getattr(self, f"block{i}")(x)
        out["layer3"] = x
        out["layer4"] = self.conv5(self.conv4(self.conv3(self.block20(x))))
        return {name: out[name] for name in LAYERS if name in wanted}


@register_backbone("xception65")
def xception65(output_stride=None, frozen_bn=True, code_input=True):
    return Xception65(16 if output_stride is None else output_stride, frozen_bn, code_input)
