"""Certified bf16 search for ``max_cosine``: bf16 scores, fp32 answers.

Every (support pixel, query pixel) pair is scored with bf16 inputs (fp32 accumulation inside the GEMM, the
product rounded to bf16), then each row's candidates, the pixels whose bf16 cosine lies within a proven bound
of the row's bf16 maximum, are rescored in fp32. The returned argmax is the fp32 kernel's (where two pixels'
cosines tie exactly, rounding may pick the other) and the max its value within fp32 rounding (the rescoring
sums the C products in another order: up to 1.2e-7 apart on random features).

The bound. With u = 2^-8 (bf16 unit roundoff) and g = C 2^-24 / (1 - C 2^-24) (fp32 summation of C terms),
for the true dot product d of a support pixel s and a query pixel q, the bf16 score d~ satisfies
    |d~ - d| <= (3u + 3u^2 + u^3) |s| |q|            (inputs rounded: 2u + u^2; output rounded: u(1 + ...))
              + g (1 + u)^3 |s| |q|                   (fp32 accumulation of the rounded products)
and the fp32 kernel's own dot is within g |s| |q| of d. Dividing by |s| |q| + eps (the norms of the fp32
inputs, as the kernel takes them; a few fp32 roundings more are added), each pair's cosine error, bf16
against the fp32 kernel, is at most e = r |s| |q| / (|s| |q| + eps) <= r ~ 0.0118. If j* is the fp32
argmax and m the bf16 one, c~_j* >= c_j* - e >= c_m - e >= c~_m - 2e: the fp32 argmax is among the pixels
within 2 max(e) of the row's bf16 maximum, and rescoring all of them in fp32 finds it.

Here rows are processed a chunk of query pixels at a time, so the extra memory is one (B, K, Ns, chunk) score
block whatever the image size; this version runs on GPUs. On the CPU the op runs a C++ kernel
(csrc/ops/cpu/max_cosine_bf16_search_kernel.cpp): one pass over tiles of support pixels, with a per-pair bound
built the same way from each row's actual rounding error instead of the worst case (a third of r on real
features), each candidate rescored as it appears, and no gather of (pairs, C) operands. Non-finite inputs go to
the fp32 kernel (its NaN rules stay exact).
"""
from contextlib import contextmanager
from typing import Tuple

import torch

U_BF16 = 2.0 ** -8
U_FP32 = 2.0 ** -24
_MODES = ("auto", "always", "never")
_mode = "auto"
_CHUNK_ELEMENTS = 1 << 22  # one (B, K, Ns, chunk) fp32 score block: 16 MiB


def bf16_hardware(device: torch.device) -> str:
    """The bf16 matrix unit the search would use on ``device``, or "" when there is none."""
    if device.type == "cuda":
        return "tensor cores" if torch.cuda.get_device_capability(device)[0] >= 8 else ""
    if device.type == "cpu":
        if torch.cpu._is_amx_tile_supported():
            return "AMX-BF16"
        if torch.cpu._is_avx512_bf16_supported():
            return "AVX512-BF16"
    return ""


@contextmanager
def bf16_search(mode: str):
    """Override where the bf16 search runs: "auto" (only on bf16 hardware; elsewhere bf16 products are
    emulated and slower than fp32, so the fp32 kernel runs), "always" (tests: the certified path everywhere),
    "never"."""
    global _mode
    if mode not in _MODES:
        raise ValueError(f"bf16_search: mode must be one of {_MODES}, got {mode!r}")
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def uses_bf16_search(query: torch.Tensor) -> bool:
    """Whether ``max_cosine(..., search_dtype=torch.bfloat16)`` takes the bf16 path for this input. Not under
    autocast: max_cosine's autocast rule casts float32 inputs to the autocast dtype first, and the search must
    leave that as it finds it (it used to run on the uncast inputs, and refused a float32 query beside a bfloat16
    support that the default path accepts)."""
    if query.dtype != torch.float32 or _mode == "never" or torch.is_autocast_enabled(query.device.type):
        return False
    return _mode == "always" or bool(bf16_hardware(query.device))


def error_bound(C: int) -> float:
    """r: the largest cosine error of one bf16-scored pair against the fp32 kernel (see the module doc)."""
    g = C * U_FP32 / (1 - C * U_FP32)
    return 3 * U_BF16 + 3 * U_BF16 ** 2 + U_BF16 ** 3 + g * (1 + U_BF16) ** 3 + g + 8 * U_FP32


def _candidates(q_lo, s_lo, nq, ns, fg, eps, r, i0, i1):
    """(B, K, Ns, n) bool: the pixels within twice the row's bound of its bf16 maximum, for query i0:i1."""
    dots = torch.matmul(s_lo, q_lo[:, None, :, i0:i1]).float()  # (B, K, Ns, n), fp32 accumulation inside
    prod = ns[..., None] * nq[:, None, None, i0:i1]
    den = prod + eps
    scores = torch.where(fg[..., None], dots / den, float("-inf"))
    window = 2 * torch.where(fg[..., None], r * prod / den, 0.0).amax(2, keepdim=True)
    return (scores >= scores.amax(2, keepdim=True) - window) & fg[..., None]


def _pair_dots(s_rows, query, b, k, j, i, block=1 << 16):
    """fp32 dot products of support rows s_rows[b, k, j] with query columns query[b, :, i], a block of pairs at a
    time (the gathered (pairs, C) operands stay a few hundred MB at most)."""
    return torch.cat([(s_rows[b[p:p + block], k[p:p + block], j[p:p + block]] *
                       query[b[p:p + block], :, i[p:p + block]]).sum(-1) for p in range(0, len(b), block)]
                     or [query.new_zeros(0)])


def certified_max_cosine(query: torch.Tensor, support: torch.Tensor, support_weights: torch.Tensor, eps: float,
                         stats: dict = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``max_cosine`` (fp32 query (B, C, Nq), support (B, K, C, Ns), weights (B, K, Ns)) by the certified
    search: the fp32 kernel's values and indices. ``stats``, if given, receives the row and candidate counts."""
    # NaN rules (non-finite inputs; 0 / 0 with eps = 0) stay the fp32 kernel's
    if eps == 0 or not (torch.isfinite(query).all() and torch.isfinite(support).all()
                        and torch.isfinite(support_weights).all()):
        return torch.ops.fsskern.max_cosine(query, support, support_weights, eps)
    B, C, Nq = query.shape
    K, Ns = support.shape[1], support.shape[3]
    masked = support * support_weights.unsqueeze(2)  # (B, K, C, Ns): w_j s_j, as the kernel packs it
    ns = torch.linalg.vector_norm(masked, dim=2)  # (B, K, Ns)
    nq = torch.linalg.vector_norm(query, dim=1)  # (B, Nq)
    fg = support_weights != 0
    s_lo, q_lo = masked.transpose(2, 3).bfloat16(), query.bfloat16()
    s_rows = masked.transpose(2, 3)  # (B, K, Ns, C) fp32, for the rescoring
    r = error_bound(C)
    best = torch.full((B, K, Nq), float("-inf"), device=query.device)
    best_j = torch.full((B, K, Nq), -1, dtype=torch.long, device=query.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * K * Ns))
    counts = []
    for i0 in range(0, Nq, chunk):
        i1 = min(Nq, i0 + chunk)
        cand = _candidates(q_lo, s_lo, nq, ns, fg, eps, r, i0, i1)
        counts.append(cand.sum(2).flatten())
        b, k, j, i = cand.nonzero(as_tuple=True)
        i = i + i0
        # fp32 rescoring of the candidates: the dot of w_j s_j with q_i, divided as the kernel divides
        values = _pair_dots(s_rows, query, b, k, j, i) / (ns[b, k, j] * nq[b, i] + eps)
        row = (b * K + k) * Nq + i
        flat_best = best.view(-1).scatter_reduce(0, row, values, "amax")
        winner = values == flat_best[row]  # the first maximum: the lowest index among equal values
        flat_j = torch.full_like(best_j.view(-1), torch.iinfo(torch.long).max).scatter_reduce(
            0, row[winner], j[winner], "amin")
        best.view(-1).copy_(flat_best)
        best_j.view(-1).copy_(torch.where(flat_j == torch.iinfo(torch.long).max, best_j.view(-1), flat_j))
    # The background candidate (some pixel masked out): cosine 0, index -1, first in the scan, so it wins ties.
    background = (~fg).any(-1, keepdim=True).expand(B, K, Nq)
    take_bg = background & (best <= 0)
    values = torch.where(take_bg, torch.zeros_like(best), best)
    indices = torch.where(take_bg, torch.full_like(best_j, -1), best_j)
    if stats is not None:
        per_row = torch.cat(counts)
        stats.update(rows=per_row.numel(), multi=int((per_row > 1).sum()), candidates=int(per_row.sum()))
    return values, indices


def device_search(query: torch.Tensor, support: torch.Tensor, support_weights: torch.Tensor,
                  eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``fsskern::max_cosine_bf16_search`` where no device kernel is registered (GPUs): the search above. The CPU
    kernel (csrc/ops/cpu/max_cosine_bf16_search_kernel.cpp) runs it tile by tile in one pass.
    Fake and autograd are max_cosine's, registered beside it in prior_mask.py."""
    # the kernel's input checks on an empty query (a query that is not 3-d gets them whole)
    torch.ops.fsskern.max_cosine(query[:, :, :0] if query.dim() == 3 else query, support, support_weights, eps)
    if query.dtype != torch.float32:  # the search is for fp32 inputs; the CPU kernel runs max_cosine for others
        return torch.ops.fsskern.max_cosine(query, support, support_weights, eps)
    values, indices = certified_max_cosine(query.detach(), support.detach(), support_weights.detach(), eps)
    return values.contiguous(), indices.contiguous()


# registered for every device but the CPU, whose kernel is C++ (csrc/ops/cpu/max_cosine_bf16_search_kernel.cpp)
torch.library.impl("fsskern::max_cosine_bf16_search", "CompositeExplicitAutograd")(device_search)
