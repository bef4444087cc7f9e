"""Masked average pooling (MAP): support features x mask -> prototype.

Kernels: ``csrc/ops/masked_average_pool.cpp`` (schema, checks, orchestration),
``csrc/ops/cpu/`` and ``csrc/ops/cuda/masked_average_pool_kernel.*``.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._checks import check_choice

DEFAULT_EPS = {"mask": 5e-4, "features": 1e-5}
_OP = "fsskern::masked_average_pool"


def masked_average_pool(features: torch.Tensor, masks: torch.Tensor, *, resize: str = "mask",
                        eps: Optional[float] = None) -> torch.Tensor:
    """Average the features under each mask: one prototype per (image, mask).

    Args:
        features: (B, C, h, w) float32/float64, or float16/bfloat16 (accumulated in float32).
        masks: (B, N, H, W) bool, uint8 or float; N masks per image (shots, classes, fg + bg).
            Values are used as they are (a uint8 mask of 0/255 weighs 255).
        resize: how masks and features are brought to one grid.
            ``"mask"`` (PFENet, BAM, UMTFSS, CyCTR ``Weighted_GAP``): the mask is resized
            bilinear, align_corners=True, to (h, w); ``sum(f * m) / (sum(m) + eps)``.
            ``"features"`` (PANet, DPCL): equals upsampling the features bilinear
            (align_corners=False) to (H, W) and pooling there, but the upsampled features are
            never built: the mask goes through the transposed interpolation instead.
        eps: added to the mask area; default 5e-4 ("mask") or 1e-5 ("features"), as in those
            repositories. A zero denominator (all-zero mask with eps=0) gives a zero prototype.

    Returns:
        (B, N, C) prototypes in the dtype of ``features``. Differentiable w.r.t. features and
        float masks. NaN/Inf: ``"mask"`` propagates them as the reference does (every pixel is
        read). ``"features"`` reads every feature pixel too, with weight 0 where the mask does not
        reach, so a NaN/Inf anywhere in a channel makes that channel's prototypes NaN; the
        reference reads only the pixels its bilinear upsampling touches, and stays finite when
        the mask is smaller than the features and skips the bad pixel.
    """
    check_choice("masked_average_pool", "resize", resize, DEFAULT_EPS)
    if eps is None:
        eps = DEFAULT_EPS[resize]
    prototypes, _ = torch.ops.fsskern.masked_average_pool(features, masks, resize, float(eps))
    return prototypes


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, ignore_index: int = 255,
                     resize: str = "mask", eps: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """All class prototypes of a label map in one pass over the features (POPNet k-way, DPCL).

    Args:
        features: (B, C, h, w).
        labels: (B, H, W) integer class map; values in [0, num_classes) or ``ignore_index``
            (which belongs to no class).
        resize: ``"mask"`` / ``"features"`` as in :func:`masked_average_pool`, or ``"nearest"``
            (POPNet): labels resized nearest to (h, w), each class divided by its pixel count
            with no eps (an absent class gets a zero prototype).

    Returns:
        prototypes (B, num_classes, C) and counts (B, num_classes): the (resized) mask area of
        each class, in float32 (float64 for float64 features) whatever the features' dtype.
    """
    check_choice("class_prototypes", "resize", resize, {"mask", "features", "nearest"})
    if labels.dim() != 3 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"class_prototypes: labels must be an integer (B, H, W) tensor, got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    if num_classes < 1:
        raise ValueError(f"class_prototypes: num_classes must be >= 1, got {num_classes}")
    for name, size in (("features", features.shape[-2:]), ("labels", labels.shape[-2:])):
        if 0 in size:
            raise ValueError(f"class_prototypes: {name} must have a non-empty spatial size, got {tuple(size)}")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        raise ValueError(f"class_prototypes: labels must lie in [0, {num_classes}) or equal ignore_index="
                         f"{ignore_index}; found {labels[bad].unique()[:8].tolist()}")
    if resize == "nearest":
        labels = F.interpolate(labels[:, None].double(), size=features.shape[-2:], mode="nearest")[:, 0].long()
        resize, eps = "mask", 0.0 if eps is None else eps
    classes = torch.arange(num_classes, device=labels.device).view(1, -1, 1, 1)
    # An ignore_index inside [0, num_classes) (0, or 255 with more classes) must not pool into that class.
    masks = (labels.unsqueeze(1) == classes) & (labels != ignore_index).unsqueeze(1)
    if eps is None:
        eps = DEFAULT_EPS[resize]
    return torch.ops.fsskern.masked_average_pool(features, masks, resize, float(eps))


@torch.library.register_fake(_OP)
def _(features, masks, resize, eps):
    torch._check(features.dim() == 4, lambda: f"masked_average_pool: features must be 4-d, got {features.dim()}-d")
    torch._check(masks.dim() == 4, lambda: f"masked_average_pool: masks must be 4-d, got {masks.dim()}-d")
    torch._check(features.shape[0] == masks.shape[0], lambda: "masked_average_pool: batch sizes differ")
    torch._check(features.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16),
                 lambda: f"masked_average_pool: features must be floating, got {features.dtype}")
    torch._check(features.device == masks.device, lambda: "masked_average_pool: features and masks must be on the "
                 f"same device, got {features.device} and {masks.device}")
    opmath = torch.float64 if features.dtype == torch.float64 else torch.float32
    B, C, N = features.shape[0], features.shape[1], masks.shape[1]
    return features.new_empty((B, N, C)), features.new_empty((B, N), dtype=opmath)


@torch.library.register_fake("fsskern::_masked_average_pool_backward_features")
def _(grad_prototypes, features, masks, area, resize, eps):
    return features.new_empty(features.shape)  # the kernel returns a contiguous tensor


@torch.library.register_fake("fsskern::_masked_average_pool_backward_masks")
def _(grad_prototypes, grad_area, features, masks, prototypes, area, resize, eps):
    return masks.new_empty(masks.shape)  # the kernel returns a contiguous tensor


def _setup_context(ctx, inputs, output):
    features, masks, resize, eps = inputs
    prototypes, area = output
    ctx.resize, ctx.eps = resize, eps
    # only the masks' gradient reads the prototypes, and area is a (B, N) copy: a caller may then edit either
    # output in place (counts.clamp_(min=1)) as with the reference, without breaking the features' backward
    ctx.save_for_backward(features, masks, prototypes if ctx.needs_input_grad[1] else None, area.clone())


def _backward(ctx, grad_prototypes, grad_area):
    features, masks, prototypes, area = ctx.saved_tensors
    grad_features = grad_masks = None
    if ctx.needs_input_grad[0]:
        grad_features = torch.ops.fsskern._masked_average_pool_backward_features(
            grad_prototypes, features, masks, area, ctx.resize, ctx.eps)
    if ctx.needs_input_grad[1]:
        grad_masks = torch.ops.fsskern._masked_average_pool_backward_masks(
            grad_prototypes, grad_area, features, masks, prototypes, area, ctx.resize, ctx.eps)
    return grad_features, grad_masks, None, None


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
