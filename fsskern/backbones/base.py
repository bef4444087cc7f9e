"""What every backbone shares: the layer0..layer4 output dict, frozen BatchNorm, and ``freeze``."""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

LAYERS = ("layer0", "layer1", "layer2", "layer3", "layer4")


class Backbone(nn.Module):
    """Base class: subclasses set ``channels`` and ``strides`` ({layer: int}) and implement ``stages()``.

    ``forward(x)`` with x (B, 3, H, W) float (ImageNet-normalised) returns {"layer0": ..., "layer4": ...},
    each (B, channels[name], ceil(H / strides[name]), ceil(W / strides[name])). With ``frozen_bn`` every
    BatchNorm stays in eval mode (running statistics used and never updated) whatever ``train()`` is called
    with, and its weight and bias have ``requires_grad=False``; the rest of the backbone stays trainable unless
    :func:`freeze` is called.
    """
    channels: Dict[str, int]
    strides: Dict[str, int]

    def __init__(self, frozen_bn: bool = True):
        super().__init__()
        self.frozen_bn = frozen_bn
        self.frozen = False

    def stages(self):
        """The (name, callable) pairs run one after another; each output is returned under its name."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, layers: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """``layers``: the outputs to return (default all five). The stages after the deepest one are skipped
        and the other outputs are not kept, so a pass without autograd holds only what the caller reads (at
        473, ResNet-50, batch 2: layer0 and layer1 are ~60 MB alive through layer4, the peak)."""
        wanted = self.wanted(layers)
        last = max(LAYERS.index(name) for name in wanted)
        out = {}
        for name, stage in self.stages()[:last + 1]:
            x = stage(x)
            if name in wanted:
                out[name] = x
        return out

    def wanted(self, layers: Optional[Sequence[str]]) -> Tuple[str, ...]:
        """``forward``'s ``layers`` argument checked: all five when None."""
        wanted = LAYERS if layers is None else tuple(layers)
        if not wanted or any(name not in LAYERS for name in wanted):
            raise ValueError(f"{type(self).__name__}: layers must be a non-empty subset of {LAYERS}, got {layers}")
        return wanted

    def finish_init(self):
        """Called by subclasses at the end of __init__: applies frozen BN to the built modules."""
        if self.frozen_bn:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode and not self.frozen)
        if self.frozen_bn and not self.frozen:
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a whole module: no parameter takes a gradient and it runs in eval mode (BN statistics and
    dropout). A :class:`Backbone` stays in eval mode through later ``train()`` calls; any other module
    is put in eval mode now only, so a parent's ``train()`` switches it back."""
    module.requires_grad_(False)
    if isinstance(module, Backbone):
        module.frozen = True
    module.eval()
    return module
