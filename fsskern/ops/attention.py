"""Fused attention from query pixels to support information.

``prototype_attention`` (UMTFSS: query tokens attend to fg/bg prototypes) and
``local_conditional_attention`` (CRCNet: query pixels attend to support foreground pixels) share
one flash-style core (``csrc/ops/attention.*``, CPU and CUDA kernels): scores, mask, softmax,
dropout and the weighted sum of values in one pass per query tile, backward by recomputation
from the saved row logsumexp. Neither keeps the (N x P) probability matrix.
"""
from typing import Optional

import torch

from ._autocast import cast_inputs_under_autocast
from ._checks import check_choice

_SEED_RANGE = 2 ** 62


def prototype_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        key_valid: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                        dropout_p: float = 0.0, seed: Optional[int] = None) -> torch.Tensor:
    """softmax(scale q k^T, invalid keys excluded) v, with dropout on the attention weights.

    Args:
        q: (B, H, N, D) query tokens: float32/float64, or float16/bfloat16 read as they are with every
            score, softmax step and sum in float32 (under ``torch.autocast`` float32 inputs are cast to the
            autocast dtype first).
        k, v: (B, H, P, D) and (B, H, P, Dv), same dtype: the prototypes (UMTFSS: P = 70).
        key_valid: (B, P) bool; invalid keys get no weight. UMTFSS adds -10000 instead, which is
            the same unless every key of an image is invalid: then the output is 0 here (and
            the gradients 0), not the reference's plain softmax over those keys.
        scale: multiplies the scores; default D ** -0.5.
        dropout_p: probability of zeroing an attention weight (kept weights scaled by
            1 / (1 - p)), after the softmax as in UMTFSS. Pass 0 in evaluation.
        seed: keys the counter-based RNG (Philox): the same seed gives the same mask on CPU and
            CUDA and in backward. None draws one from torch's default generator.

    Returns:
        (B, H, N, Dv) in the dtype of q. Differentiable w.r.t. q, k and v.
    """
    if scale is None:
        if q.dim() == 4 and q.shape[-1] == 0:
            raise ValueError("prototype_attention: the default scale D ** -0.5 needs D >= 1, q has D = 0; "
                             "pass scale explicitly (every score is 0 then, whatever the scale)")
        scale = q.shape[-1] ** -0.5
    if dropout_p == 0:
        seed = 0
    elif seed is None:
        seed = int(torch.randint(_SEED_RANGE, (1,)).item())
    elif not -2 ** 63 <= seed < 2 ** 63:
        raise ValueError(f"prototype_attention: seed must fit in int64 ([-2**63, 2**63)), got {seed}")
    out, _ = torch.ops.fsskern.prototype_attention(q, k, v, key_valid, float(scale), float(dropout_p), int(seed))
    return out


def local_conditional_attention(query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor, *,
                                value: Optional[torch.Tensor] = None, mode: str = "exclude") -> torch.Tensor:
    """CRCNet's local conditional module: ``value . softmax_rows(query^T support, masked)^T``.

    Args:
        query: (B, C, Nq) query features (CRCNet: after its 1x1 conv + ReLU, theta): float32/float64, or
            float16/bfloat16 computed in float32 as in :func:`prototype_attention`.
        support: (B, C, Ns) support features (delta).
        support_mask: (B, Ns) bool or float holding only 0 and 1.
        value: (B, Cv, Ns) the features that are averaged; default ``support``.
        mode: "exclude", a true masked softmax over the foreground pixels (an image without
            foreground gives 0); or "multiply", CRCNet's equation taken literally: the logits
            are multiplied by the mask, so every background logit is exactly 0 and the
            background still gets weight (computed as one constant key, never pixel by pixel).

    Returns:
        (B, Cv, Nq) in query's dtype, differentiable w.r.t. query, support and value. No scaling of the logits
        (CRCNet has none).
    """
    check_choice("local_conditional_attention", "mode", mode, {"exclude", "multiply"})
    out, _ = torch.ops.fsskern.local_conditional_attention(query, support, support_mask,
                                                           support if value is None else value, mode)
    return out


# ---- fake kernels --------------------------------------------------------------------------------

def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The row logsumexp is kept in float32 for float16/bfloat16 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("fsskern::prototype_attention")
def _(q, k, v, key_valid, scale, dropout_p, seed):
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: "prototype_attention: q, k and v must be 4-d")
    torch._check(q.device == k.device == v.device and (key_valid is None or key_valid.device == q.device),
                 lambda: "prototype_attention: all inputs must be on one device")
    # the kernel's shape checks, so that a traced graph fails where the eager call would
    torch._check(k.shape[:2] == q.shape[:2] and v.shape[:2] == q.shape[:2],
                 lambda: f"prototype_attention: q, k and v must share (B, H), got {q.shape}, {k.shape}, {v.shape}")
    torch._check(k.shape[3] == q.shape[3], lambda: "prototype_attention: q and k must share D")
    torch._check(v.shape[2] == k.shape[2], lambda: "prototype_attention: k and v must have the same number of keys")
    torch._check(key_valid is None or tuple(key_valid.shape) == (k.shape[0], k.shape[2]),
                 lambda: "prototype_attention: key_valid must be (B, P)")
    B, H, N = q.shape[:3]
    return q.new_empty((B, H, N, v.shape[3])), q.new_empty((B, H, N), dtype=_lse_dtype(q.dtype))


@torch.library.register_fake("fsskern::_prototype_attention_backward")
def _(grad_out, q, k, v, key_valid, out, lse, scale, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("fsskern::local_conditional_attention")
def _(query, support, support_mask, value, mode):
    torch._check(query.dim() == 3 and support.dim() == 3 and value.dim() == 3,
                 lambda: "local_conditional_attention: query, support and value must be 3-d")
    torch._check(query.device == support.device == value.device == support_mask.device,
                 lambda: "local_conditional_attention: all inputs must be on one device")
    torch._check(support.shape[0] == query.shape[0] and value.shape[0] == query.shape[0],
                 lambda: "local_conditional_attention: batch sizes differ")
    torch._check(support.shape[1] == query.shape[1], lambda: "local_conditional_attention: channel counts differ")
    pixels = support.shape[2]
    torch._check(value.shape[2] == pixels and tuple(support_mask.shape) == (support.shape[0], pixels),
                 lambda: "local_conditional_attention: value and support_mask must have the support's pixels")
    B, _, Nq = query.shape
    return query.new_empty((B, value.shape[1], Nq)), query.new_empty((B, Nq), dtype=_lse_dtype(query.dtype))


@torch.library.register_fake("fsskern::_local_conditional_attention_backward")
def _(grad_out, query, support, support_mask, value, out, lse, mode):
    return query.new_empty(query.shape), support.new_empty(support.shape), value.new_empty(value.shape)


# ---- autograd ------------------------------------------------------------------------------------

def _prototype_setup(ctx, inputs, output):
    q, k, v, key_valid, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.args = (scale, dropout_p, seed)
    ctx.save_for_backward(q, k, v, key_valid, out, lse)


def _prototype_backward(ctx, grad_out, grad_lse):
    q, k, v, key_valid, out, lse = ctx.saved_tensors
    grads = torch.ops.fsskern._prototype_attention_backward(grad_out, q, k, v, key_valid, out, lse, *ctx.args)
    return (*[g if need else None for g, need in zip(grads, ctx.needs_input_grad[:3])], None, None, None, None)


torch.library.register_autograd("fsskern::prototype_attention", _prototype_backward, setup_context=_prototype_setup)


def _local_setup(ctx, inputs, output):
    query, support, support_mask, value, mode = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.mode = mode
    ctx.save_for_backward(query, support, support_mask, value, out, lse)


def _local_backward(ctx, grad_out, grad_lse):
    query, support, support_mask, value, out, lse = ctx.saved_tensors
    if ctx.needs_input_grad[2]:
        raise RuntimeError("local_conditional_attention: gradients w.r.t. support_mask are not supported")
    gq, gs, gv = torch.ops.fsskern._local_conditional_attention_backward(grad_out, query, support, support_mask,
                                                                         value, out, lse, ctx.mode)
    need = ctx.needs_input_grad
    return gq if need[0] else None, gs if need[1] else None, None, gv if need[3] else None, None


torch.library.register_autograd("fsskern::local_conditional_attention", _local_backward, setup_context=_local_setup)
cast_inputs_under_autocast("prototype_attention")
cast_inputs_under_autocast("local_conditional_attention")
