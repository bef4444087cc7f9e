"""VGG16-bn split into layer0..layer4 as BAM/PFENet split it (``get_vgg16_layer``).

``features`` keeps torchvision's module indices, so torchvision's / BAM's ``vgg16_bn.pth`` loads under its own
key names (``features.N.*``); the max-pools use ``ceil_mode=True`` as BAM's ``make_layers`` (473 -> 237 -> 119
-> 60 -> 30). The last max-pool (index 43) is dropped, so layer3 and layer4 share one grid (output stride 16).
"""
import torch.nn as nn
from torchvision.models import vgg as tv

from .base import Backbone
from .registry import register_backbone

SPLIT = {"layer0": (0, 7), "layer1": (7, 14), "layer2": (14, 24), "layer3": (24, 34), "layer4": (34, 43)}


class VGG16BN(Backbone):
    """layer0 64 ch (stride 2), layer1 128 (4), layer2 256 (8), layer3 512 (16), layer4 512 (16).

    last_relu: False drops the ReLU after conv5_3 (index 42), as PANet's VGG (``lastRelu=False``): signed
    layer4 features, whose cosines span [-1, 1].
    """

    def __init__(self, frozen_bn=True, last_relu=True):
        super().__init__(frozen_bn)
        end = SPLIT["layer4"][1] if last_relu else SPLIT["layer4"][1] - 1
        features = tv.make_layers(tv.cfgs["D"], batch_norm=True)[:end]
        for m in features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
            elif isinstance(m, nn.Conv2d):  # torchvision's VGG.__init__ init, which make_layers alone skips
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.features = features
        self.split = {**SPLIT, "layer4": (SPLIT["layer4"][0], end)}
        self.channels = {"layer0": 64, "layer1": 128, "layer2": 256, "layer3": 512, "layer4": 512}
        self.strides = {"layer0": 2, "layer1": 4, "layer2": 8, "layer3": 16, "layer4": 16}
        self.finish_init()

    def stages(self):
        return [(name, self.features[a:b]) for name, (a, b) in self.split.items()]


@register_backbone("vgg16_bn")
def vgg16_bn(output_stride=None, frozen_bn=True, last_relu=True):
    if output_stride not in (None, 16):
        raise ValueError(f"vgg16_bn: BAM's split has output stride 16 (no dilation), got output_stride={output_stride}")
    return VGG16BN(frozen_bn, last_relu)
