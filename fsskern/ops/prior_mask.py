"""Max-cosine prior mask (PFENet, BAM; RILFS builds on them).

The heavy part, ``torch.ops.fsskern.max_cosine``, is fused (``csrc/ops/max_cosine.*``, CPU and
CUDA kernels); the O(B K Nq) steps around it (mask resize, min-max, mean, output resize) are
ordinary differentiable torch ops written as in PFENet.
"""
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._autocast import cast_inputs_under_autocast
from ._checks import check_choice
from .certified_search import uses_bf16_search

_OP = "fsskern::max_cosine"


def max_cosine(query: torch.Tensor, support: torch.Tensor, support_weights: torch.Tensor, *,
               eps: float = 1e-7, search_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per query pixel and shot, the max over support pixels of the cosine with the masked support.

    Args:
        query: (B, C, Nq) float32/float64, or float16/bfloat16 read as they are and computed in float32
            (under ``torch.autocast`` float32 inputs are cast to the autocast dtype first).
        support: (B, K, C, Ns), same dtype.
        support_weights: (B, K, Ns) mask on the support feature grid; pixels with weight 0 are
            skipped, and count as the reference's zero vectors (cosine exactly 0).
        eps: added to the product of the norms, as PFENet's ``cosine_eps``.
        search_dtype: ``torch.bfloat16`` scores the pairs with bf16 products and rescores in fp32 every
            pixel within a proven bound of its row's maximum (:mod:`fsskern.ops.certified_search`): the same
            values and indices as the fp32 kernel. Taken only for fp32 inputs on bf16 hardware (AMX-BF16,
            AVX512-BF16, CUDA tensor cores); elsewhere the fp32 kernel runs (``build_info()["bf16_search"]``).

    Returns:
        values (B, K, Nq), float32 for float16/bfloat16 inputs (as autocast's ``cosine_similarity``), and
        indices (B, K, Nq) int64: the maximising support pixel, or -1
        when the maximum is a masked-out pixel. Differentiable w.r.t. query and support.
    """
    if search_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"max_cosine: search_dtype must be None, torch.float32 or torch.bfloat16, got {search_dtype}")
    if search_dtype == torch.bfloat16 and uses_bf16_search(query):
        return torch.ops.fsskern.max_cosine_bf16_search(query, support, support_weights, float(eps))
    return torch.ops.fsskern.max_cosine(query, support, support_weights, float(eps))


def prior_mask(query: torch.Tensor, support: torch.Tensor, support_masks: torch.Tensor, *, eps: float = 1e-7,
               normalize: bool = True, reduce: Optional[str] = "mean",
               out_size: Optional[Sequence[int]] = None, search_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """The PFENet/BAM training-free prior, fused: the (HWs x HWq) similarity never exists.

    Args:
        query: (B, C, hq, wq) query features (PFENet: layer4, 2048-d).
        support: (B, K, C, hs, ws) support features of K shots.
        support_masks: (B, K, H, W) support masks (any size; resized bilinear, align_corners=True,
            to (hs, ws) as in PFENet). Gradients to the masks are not supported.
        eps: PFENet's ``cosine_eps`` (1e-7), used in the cosine and in the min-max.
        normalize: per image and shot, min-max normalise over the query pixels; False returns
            the raw max cosine.
        reduce: "mean" (PFENet: mean over shots, output (B, 1, ...)) or None (per shot,
            (B, K, ...), for BAM/RILFS to weight or fuse).
        out_size: resize the prior bilinear, align_corners=True, to this (h, w); None keeps
            (hq, wq). Non-square features are fine.
        search_dtype: ``torch.bfloat16``: the certified bf16 search of :func:`max_cosine` (the fp32 argmax;
            values within fp32 rounding).

    Returns:
        (B, 1 or K, h, w) prior in the dtype of ``query`` (float32 for float16/bfloat16). Where every support
        pixel of a shot is masked out the prior is 0; NaN/Inf in the features give NaN as in the reference.
    """
    check_choice("prior_mask", "reduce", reduce, {"mean", None})
    if query.dim() != 4 or support.dim() != 5 or support_masks.dim() != 4:
        raise ValueError(f"prior_mask: expected query (B, C, hq, wq), support (B, K, C, hs, ws) and support_masks "
                         f"(B, K, H, W); got {tuple(query.shape)}, {tuple(support.shape)}, "
                         f"{tuple(support_masks.shape)}")
    if support_masks.requires_grad and torch.is_grad_enabled():  # (under no_grad nothing would be differentiated)
        raise ValueError("prior_mask: gradients w.r.t. support_masks are not supported (the reference's are "
                         "degenerate: d cos / d mask is dot / eps at masked-out pixels); pass masks.detach()")
    if support_masks.shape[:2] != support.shape[:2]:
        raise ValueError(f"prior_mask: support_masks must be (B, K, H, W) with (B, K) = {tuple(support.shape[:2])}, "
                         f"got {tuple(support_masks.shape)}")
    B, K, C, hs, ws = support.shape
    if K == 0:  # the mean over no shot was an all-NaN prior
        raise ValueError("prior_mask: support must hold at least one shot, got K = 0")
    hq, wq = query.shape[-2:]
    if out_size is not None and not isinstance(out_size, (tuple, list, torch.Size)):
        raise ValueError(f"prior_mask: out_size must be an (h, w) pair, got {out_size!r}")
    for name, size in (("query", (hq, wq)), ("support", (hs, ws)), ("support_masks", support_masks.shape[-2:]),
                       ("out_size", (1, 1) if out_size is None else tuple(out_size))):
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"prior_mask: {name} must have a non-empty (h, w) grid, got {tuple(size)}")
    masks = support_masks.to(query.dtype)
    if masks.shape[-2:] != (hs, ws):
        masks = F.interpolate(masks, size=(hs, ws), mode="bilinear", align_corners=True)
    values, _ = max_cosine(query.flatten(2), support.flatten(3), masks.flatten(2), eps=eps, search_dtype=search_dtype)
    if normalize:
        lo = values.min(-1, keepdim=True)[0]
        hi = values.max(-1, keepdim=True)[0]
        values = (values - lo) / (hi - lo + eps)
    prior = values.view(B, K, hq, wq)
    if reduce == "mean":
        prior = prior.mean(1, keepdim=True)
    if out_size is not None and tuple(out_size) != (hq, wq):
        prior = F.interpolate(prior, size=tuple(out_size), mode="bilinear", align_corners=True)
    return prior


@torch.library.register_fake(_OP)
@torch.library.register_fake("fsskern::max_cosine_bf16_search")  # the same outputs, by another search
def _(query, support, support_weights, eps):
    torch._check(query.dim() == 3 and support.dim() == 4 and support_weights.dim() == 3,
                 lambda: "max_cosine: expected query (B, C, Nq), support (B, K, C, Ns), weights (B, K, Ns)")
    torch._check(query.device == support.device == support_weights.device,
                 lambda: "max_cosine: all inputs must be on one device")
    torch._check(support.shape[0] == query.shape[0] and support.shape[2] == query.shape[1]
                 and tuple(support_weights.shape) == (support.shape[0], support.shape[1], support.shape[3]),
                 lambda: "max_cosine: batch, channels or support pixels differ between query, support and weights")
    B, K, Nq = support.shape[0], support.shape[1], query.shape[2]
    values_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return query.new_empty((B, K, Nq), dtype=values_dtype), query.new_empty((B, K, Nq), dtype=torch.int64)


@torch.library.register_fake("fsskern::_max_cosine_backward")
def _(grad_values, query, support, support_weights, indices, eps):
    return query.new_empty(query.shape), support.new_empty(support.shape)


def _setup_context(ctx, inputs, output):
    query, support, support_weights, eps = inputs
    _, indices = output
    ctx.eps = eps
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(query, support, support_weights, indices)


def _backward(ctx, grad_values, grad_indices):
    query, support, support_weights, indices = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise RuntimeError("max_cosine: gradients w.r.t. support_weights are not supported")
    grad_query, grad_support = torch.ops.fsskern._max_cosine_backward(
        grad_values, query, support, support_weights, indices, ctx.eps)
    return (grad_query if ctx.needs_input_grad[0] else None,
            grad_support if ctx.needs_input_grad[1] else None, None, None)


torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)
torch.library.register_autograd("fsskern::max_cosine_bf16_search", _backward, setup_context=_setup_context)
cast_inputs_under_autocast("max_cosine")
