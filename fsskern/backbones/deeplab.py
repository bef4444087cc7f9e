"""DeepLabV3+ (Chen et al. 2018) on a registered backbone: the encoder POPNet builds on.

POPNet uses DeepLabV3+ with aligned Xception-65 at output stride 16 (``deeplabv3plus_xception65``: its
backbone loads from the public code's COCO-pretrained checkpoint given as a file; notes D4); the encoder takes any
backbone with a stride-4 low-level map: Xception-65 (block2's, 256 ch), ResNet-50 (torchvision stem, dilated as
torchvision's ``replace_stride_with_dilation``, the first block of a dilated layer keeping the previous dilation,
as DeepLab ports such as VainF's build it; low level = layer1, 256 ch) or MobileNetV2 (layer1, 24 ch); high level =
layer4. The ASPP and decoder below are DeepLabV3+'s with plain (not separable) atrous convs for every backbone,
and train from their init. The decoder has DeepLabV3+'s two 3x3 convs; POPNet's code reads its features after
the first of its decoder's separable blocks (``decoder1``), so the second conv is ours (docs/methods/popnet.md).
ASPP (1x1, three 3x3 atrous, image pooling; 256 channels each, rates 6/12/18 at output stride 16, doubled at 8),
then the decoder: low level -> 1x1 conv 48, concat with the upsampled ASPP output (bilinear, align_corners=True as
POPNet's code), two 3x3 convs of 256. ``width`` (default 256, the paper's)
sets the ASPP and decoder channels: CPU recipes narrow it, since every later conv scales with it squared.
"""
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import build_backbone, register_backbone

RATES = {8: (12, 24, 36), 16: (6, 12, 18)}


def _conv_bn_relu(cin, cout, k=1, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=dilation * (k // 2), dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ASPP(nn.Module):
    def __init__(self, cin, rates, cout=256):
        super().__init__()
        self.branches = nn.ModuleList([_conv_bn_relu(cin, cout)] + [_conv_bn_relu(cin, cout, 3, r) for r in rates])
        self.pool = _conv_bn_relu(cin, cout)
        self.project = _conv_bn_relu(cout * (len(rates) + 2), cout)

    def forward(self, x):
        pooled = self.pool(F.adaptive_avg_pool2d(x, 1)).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], 1))


class DeepLabV3Plus(nn.Module):
    """forward(x (B, 3, H, W)) -> {"decoder": (B, width, h4, w4) at the backbone's layer1 grid (stride 4),
    "encoder": (B, width, h, w) the ASPP output at the output stride}. ``self.backbone`` is the registered
    backbone (frozen BN as asked); ASPP and decoder BatchNorms are ordinary (trainable)."""

    def __init__(self, backbone: str, output_stride=16, frozen_bn=True, width: int = 256, **kw):
        super().__init__()
        if output_stride not in RATES:
            raise ValueError(f"DeepLabV3+: output_stride must be 8 or 16, got {output_stride}")
        self.backbone_name = backbone
        self.backbone = build_backbone(backbone, frozen_bn=frozen_bn, output_stride=output_stride, **kw)
        self.aspp = ASPP(self.backbone.channels["layer4"], RATES[output_stride], width)
        self.low_level = _conv_bn_relu(self.backbone.channels["layer1"], 48)
        self.decoder = nn.Sequential(_conv_bn_relu(width + 48, width, 3), _conv_bn_relu(width, width, 3))
        self.channels = {"decoder": width, "encoder": width}
        self.strides = {"decoder": self.backbone.strides["layer1"], "encoder": output_stride}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.backbone(x, layers=("layer1", "layer4"))
        encoder = self.aspp(feats["layer4"])
        low = self.low_level(feats["layer1"])
        up = F.interpolate(encoder, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return {"decoder": self.decoder(torch.cat([up, low], 1)), "encoder": encoder}


def _builder(backbone):
    def build(output_stride=None, frozen_bn=True, width=256, **kw):
        if backbone.startswith("resnet"):  # DeepLab's rule (VainF's replace_stride_with_dilation), not PSPNet's
            kw.setdefault("dilation", "torchvision")
        return DeepLabV3Plus(backbone, 16 if output_stride is None else output_stride, frozen_bn, width, **kw)
    return build


for _name in ("xception65", "resnet50", "mobilenet_v2"):
    register_backbone(f"deeplabv3plus_{_name}")(_builder(_name))
