"""MobileNetV2 (torchvision's architecture) dilated to output stride 8, its stages mapped to ResNet's roles.

``features`` keeps torchvision's indices, so ``mobilenet_v2-b0353104.pth`` loads under its own key names.

| layer  | features | channels | stride (OS 8) | plays ResNet's      |
|--------|----------|----------|---------------|---------------------|
| layer0 | [0:2]    | 16       | 2             | stem                |
| layer1 | [2:4]    | 24       | 4             | layer1 (low level)  |
| layer2 | [4:7]    | 32       | 8             | layer2 (mid level)  |
| layer3 | [7:14]   | 96       | 8             | layer3 (mid level)  |
| layer4 | [14:18]  | 320      | 8             | layer4 (high level) |

layer4 ends at features[17] (320 channels), not at the 1x1 conv features[18] (1280): that conv expands the last
stage for the ImageNet classifier and adds no spatial context; DeepLabV3+ on MobileNetV2 also takes its
high-level features before it, and 320-d keeps the prior / attention cheap. ``last_conv=True`` appends it
(layer4 then has 1280 channels).
"""
from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

from .base import Backbone
from .registry import register_backbone

SPLIT = {"layer0": (0, 2), "layer1": (2, 4), "layer2": (4, 7), "layer3": (7, 14), "layer4": (14, 18)}


class MobileNetV2(Backbone):
    """Args: output_stride 8, 16 or 32; last_conv: include features[18] (1280 channels) in layer4.

    Dilation follows DeepLabV3+'s MobileNetV2: once the output stride is reached, a stride-2 block gets
    stride 1 and keeps the previous dilation on its depthwise conv; the blocks after it have the dilation
    multiplied by 2.
    """

    def __init__(self, output_stride=8, frozen_bn=True, last_conv=False):
        super().__init__(frozen_bn)
        if output_stride not in (8, 16, 32):
            raise ValueError(f"mobilenet_v2: output_stride must be 8, 16 or 32, got {output_stride}")
        features = tv_mobilenet_v2(weights=None).features
        self.split = dict(SPLIT, layer4=(14, 19 if last_conv else 18))
        self.features = features[:self.split["layer4"][1]]
        stride, dilation, strides = 2, 1, {}  # features[0] is the stride-2 stem conv
        for i, block in enumerate(self.features[1:18], start=1):
            dw = block.conv[-3][0]  # ConvBNReLU (depthwise 3x3) before the 1x1 projection
            d = dilation
            if dw.stride == (2, 2):
                if stride == output_stride:
                    dw.stride = (1, 1)
                    dilation *= 2  # from the next block on; this one keeps the previous dilation
                else:
                    stride *= 2
            dw.dilation, dw.padding = (d, d), (d, d)
            for name, (a, b) in self.split.items():
                if i == min(b, 18) - 1:  # features[18] (1x1, stride 1) is not in the loop
                    strides[name] = stride
        self.strides = strides
        self.channels = {"layer0": 16, "layer1": 24, "layer2": 32, "layer3": 96, "layer4": 1280 if last_conv else 320}
        self.finish_init()

    def stages(self):
        return [(name, self.features[a:b]) for name, (a, b) in self.split.items()]


@register_backbone("mobilenet_v2")
def mobilenet_v2(output_stride=None, frozen_bn=True, **kw):
    return MobileNetV2(8 if output_stride is None else output_stride, frozen_bn, **kw)
