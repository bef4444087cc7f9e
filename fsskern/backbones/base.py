"""What every backbone shares: the layer0..layer4 output dict, frozen BatchNorm, and ``freeze``."""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

LAYERS = ("layer0", "layer1", "layer2", "layer3", "layer4")


class _StatisticsBatchNorm(torch.autograd.Function):
    """BatchNorm with fixed statistics and affine terms: y = (x - mean) * invstd * w + b. The gradient of x is
    dy * invstd * w, so nothing of x's size is kept for backward; autograd's batch_norm keeps x itself (the conv
    output before it, as large as the activation). Forward is F.batch_norm's, backward the CPU kernel's eval-mode
    formula (invstd in double, then dy * invstd * w in the tensor's dtype): both equal to the bit on the CPU
    (tests/test_backbones.py); elsewhere equal up to rounding."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps):
        ctx.save_for_backward(weight, var)
        ctx.eps = eps
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        weight, var = ctx.saved_tensors
        shape = (1, -1) + (1,) * (grad.dim() - 2)
        invstd = (1 / torch.sqrt(var.double() + ctx.eps)).to(grad.dtype)
        return grad * invstd.view(shape) * weight.view(shape), None, None, None, None, None


class LeanBatchNorm2d(nn.BatchNorm2d):
    """A backbone's BatchNorm2d (same parameters, buffers and state-dict keys) that, when it is frozen (eval mode,
    affine terms without grad) and its input needs a gradient (a trainable conv before it), keeps no activation
    for backward: each conv output was kept twice, by the BN and by the ReLU after it (POPNet's training step,
    DeepLabV3+ ResNet-50 at 512 under frozen BN: 6.9 -> 5.9 GB peak). Any other case (training statistics, a
    trainable affine, reduced precision, no grad) is nn.BatchNorm2d's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training or not self.affine or self.weight.requires_grad or self.bias.requires_grad
                or not x.requires_grad or x.dtype not in (torch.float32, torch.float64)
                or self.running_var.dtype != x.dtype):
            return super().forward(x)
        return _StatisticsBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps)


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
        wanted = self.check_layers(layers)
        last = max(LAYERS.index(name) for name in wanted)
        out = {}
        for name, stage in self.stages()[:last + 1]:
            x = stage(x)
            if name in wanted:
                out[name] = x
        return out

    def check_layers(self, layers: Optional[Sequence[str]]) -> Tuple[str, ...]:
        """``forward``'s ``layers`` argument checked: all five when None."""
        wanted = LAYERS if layers is None else tuple(layers)
        if not wanted or any(name not in LAYERS for name in wanted):
            raise ValueError(f"{type(self).__name__}: layers must be a non-empty subset of {LAYERS}, got {layers}")
        return wanted

    def finish_init(self):
        """Called by subclasses at the end of __init__: applies frozen BN to the built modules and makes every
        BatchNorm2d a :class:`LeanBatchNorm2d` (the same module, leaner under autograd once frozen)."""
        for m in self.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = LeanBatchNorm2d
            if self.frozen_bn and isinstance(m, _BatchNorm):
                m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode and not self.frozen)
        if self.frozen_bn and not self.frozen:
            fix_bn(self)
        return self


def fix_bn(module: nn.Module) -> nn.Module:
    """Every BatchNorm layer of ``module`` in eval mode (running statistics used, never updated); the rest,
    dropout included, keeps its mode. BAM's ``fix_bn``; call it after each ``train()``."""
    for m in module.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    return module


def freeze(module: nn.Module) -> nn.Module:
    """Freeze a whole module: no parameter takes a gradient and it runs in eval mode (BN statistics and
    dropout). A :class:`Backbone` stays in eval mode through later ``train()`` calls; any other module
    is put in eval mode now only, so a parent's ``train()`` switches it back."""
    module.requires_grad_(False)
    if isinstance(module, Backbone):
        module.frozen = True
    module.eval()
    return module
