"""UMTFSS's clustered prototypes: LSH hashing, Hamming k-means, cluster means.

Kernels: ``csrc/ops/{lsh_hash,hamming_kmeans,cluster_means}.*`` (CPU and CUDA). Everything is
seeded through a ``torch.Generator`` and the integer parts are identical on CPU and CUDA.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._autocast import cast_inputs_under_autocast


def lsh_planes(bits: int, dim: int, *, generator: Optional[torch.Generator] = None, dtype=torch.float32,
               device=None) -> torch.Tensor:
    """Random hyperplanes for :func:`lsh_hash`: (bits, dim + 1) standard normal, the last column
    the threshold (UMTFSS draws a fresh set per call). Drawn on the CPU, so ``generator`` is a CPU generator and
    a seed gives the same planes on every device; ``device`` moves them."""
    if not 1 <= bits <= 64:
        raise ValueError(f"lsh_planes: 1 <= bits <= 64, got {bits}")
    planes = torch.randn(bits, dim + 1, generator=generator, dtype=dtype)
    return planes.to(device) if device is not None else planes


def lsh_hash(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Sign-random-projection codes, UMTFSS's convention.

    Args:
        x: (..., E) float32/float64 points (not normalised, as in UMTFSS), any strides: e.g.
            channel-first maps ``f.flatten(-2).transpose(-1, -2)`` are hashed in place. float16/bfloat16
            points are widened exactly as they are read: their codes are those of ``x.float()``.
        planes: (bits, E + 1), 1 <= bits <= 64; bit i is ``x . planes[i, :E] > planes[i, E]``. float64
            for float64 x, else float32 (kept float32 under autocast).

    Returns:
        int64 codes of shape (...), least-significant bit first (bit 63 is the sign bit).
    """
    if x.dim() < 1:
        raise ValueError("lsh_hash: x must have a feature dimension")
    if x.dim() == 1:
        return torch.ops.fsskern.lsh_hash(x.unsqueeze(0), planes)[0]
    # (M, N, E) is what the kernels read; merging the leading dims copies only if they do not merge. M is
    # spelled out: reshape cannot infer a -1 beside a zero-size dimension.
    rows = x.reshape(math.prod(x.shape[:-2]), *x.shape[-2:]) if x.dim() > 3 else x
    return torch.ops.fsskern.lsh_hash(rows, planes).view(x.shape[:-1])


def draw_init(valid: torch.Tensor, k: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """k distinct valid points per batch item, uniformly (rows with <= k valid points get
    zeros: hamming_kmeans does not use their init). Drawn on the CPU (``generator``: a CPU generator), as
    :func:`lsh_planes`."""
    if k < 1:
        raise ValueError(f"draw_init: k must be >= 1, got {k}")
    scores = torch.rand(valid.shape, generator=generator).to(valid.device)
    scores = torch.where(valid, scores, torch.full_like(scores, -1.0))
    init = scores.topk(min(k, valid.shape[1]), dim=1).indices
    if init.shape[1] < k:
        init = torch.cat([init, init.new_zeros(init.shape[0], k - init.shape[1])], 1)
    return torch.where((valid.sum(1) > k).unsqueeze(1), init, torch.zeros_like(init))


def hamming_kmeans(codes: torch.Tensor, k: int, *, iters: int = 10, valid: Optional[torch.Tensor] = None,
                   init: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic k-means of binary codes in Hamming space (UMTFSS's clustering).

    Args:
        codes: (B, N) int64.
        k: clusters per batch item.
        iters: majority-vote updates, the same number on every device.
        valid: (B, N) bool, the points that take part (default all).
        init: (B, k) indices of k distinct valid points to start from; default drawn from
            ``generator``.

    Returns:
        assign (B, N) int64 (-1 for invalid points), centroid codes (B, k), counts (B, k).
        Assignment takes the nearest centroid, lowest index on ties; a centroid bit takes its
        members' majority, a tie keeps the previous bit, an empty cluster keeps its code. With
        no more than k valid points, each is its own cluster (the rest empty). The returned
        assignment is recomputed against the returned centroids.
    """
    if k < 1:
        raise ValueError(f"hamming_kmeans: k must be >= 1, got {k}")
    if valid is None:
        valid = torch.ones_like(codes, dtype=torch.bool)
    if valid.dtype != torch.bool or valid.shape != codes.shape:
        raise ValueError(f"hamming_kmeans: valid must be a bool tensor of the shape of codes {tuple(codes.shape)}, "
                         f"got {valid.dtype} of shape {tuple(valid.shape)}")
    if init is None:
        init = draw_init(valid, k, generator)
    return torch.ops.fsskern.hamming_kmeans(codes, valid, init, k, iters)


def cluster_means(features: torch.Tensor, assign: torch.Tensor, k: int, *,
                  eps: float = 1e-3) -> Tuple[torch.Tensor, torch.Tensor]:
    """Float mean of each cluster's features, UMTFSS's ``one_hot(assign)^T @ feats / (counts + 0.001)``.

    Args:
        features: float32/float64/float16/bfloat16, read in place (any strides) in either layout:
            (B, N, C) points by channels; or channel-first maps (B, S, C, h, w) / (B, S, C, M) of
            S shots, whose N = S*h*w points are numbered shot by shot, pixel by pixel (UMTFSS's
            token order), with no permute copy.
        assign: (B, N) int64 in [-1, k) (-1: no cluster).

    Returns:
        means (B, k, C) (differentiable w.r.t. features) and counts (B, k) int64.
    """
    if features.dim() == 5:
        features = features.flatten(3)
    return torch.ops.fsskern.cluster_means(features, assign, k, float(eps))


def support_prototypes(features: torch.Tensor, masks: torch.Tensor, *, valid: Optional[torch.Tensor] = None,
                       k_fg: int = 20, k_bg: int = 50, bits: int = 32, iters: int = 10,
                       generator: Optional[torch.Generator] = None,
                       normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """UMTFSS's clustered prototypes of the support set.

    Args:
        features: (B, K, C, h, w) support features of K shots.
        masks: (B, K, H, W) support masks, resized bilinear (align_corners=True) to (h, w); a
            token is foreground when its resized mask is >= 0.5 (ours: UMTFSS resizes nearest and
            tests == 1; the two differ at boundaries and on objects thinner than a token).
        valid: (B, K, H', W') bool, the tokens that take part (UMTFSS: False where the support
            padding mask is 255), resized nearest to (h, w) as UMTFSS resizes it; an invalid
            token is in neither set, after the fallbacks (UMTFSS drops padded tokens after
            them too). Default: every token.

    Returns:
        prototypes (B, k_fg + k_bg, C): foreground clusters first, L2-normalised when
        ``normalize``; and valid (B, k_fg + k_bg) bool. As in UMTFSS: all shots' tokens are
        hashed (one fresh set of planes per call) and clustered per image, separately for
        foreground and background; a shot without foreground gives its centre 2x2 tokens to the
        foreground, a shot without background its 4 corners to the background (the code's per-shot
        fallbacks); with no more tokens than clusters the tokens themselves are the prototypes.
        Unlike UMTFSS, empty clusters and padding rows are zero rows marked invalid, so attention
        can exclude them.
    """
    if features.dim() != 5 or masks.dim() != 4 or masks.shape[:2] != features.shape[:2]:
        raise ValueError(f"support_prototypes: expected features (B, K, C, h, w) and masks (B, K, H, W), got "
                         f"{tuple(features.shape)} and {tuple(masks.shape)}")
    if k_fg < 1 or k_bg < 1:
        raise ValueError(f"support_prototypes: k_fg and k_bg must be >= 1, got {k_fg} and {k_bg}")
    B, K, C, h, w = features.shape
    # float16/bfloat16 features (autocast) are hashed against float32 planes, masks resized in float32
    wide = torch.float64 if features.dtype == torch.float64 else torch.float32
    fg, bg = _token_sets(masks, valid, (h, w), wide)
    # Tokens are read where they lie: maps (B, K, C, hw) for the means, the same memory seen as
    # (B*K, hw, C) for the hash. Token t of image b is pixel t % hw of shot t // hw.
    maps = features.flatten(3)
    planes = lsh_planes(bits, C, generator=generator, dtype=wide, device=features.device)
    codes = lsh_hash(maps.detach().transpose(2, 3), planes).view(B, K * h * w)
    # Both clusterings first, then the means of all k_fg + k_bg clusters in one pass over the
    # tokens (background clusters numbered after the foreground ones).
    assigns, counts, raws = [], [], []
    for k, part in ((k_fg, fg.reshape(B, K * h * w)), (k_bg, bg.reshape(B, K * h * w))):  # -1: no B = 0
        assign, _, count = hamming_kmeans(codes, k, iters=iters, valid=part, generator=generator)
        assigns.append(assign)
        counts.append(count)
        raws.append(part.sum(1) <= k)
    combined = torch.where(assigns[1] >= 0, assigns[1] + k_fg, assigns[0])
    means, _ = cluster_means(maps, combined, k_fg + k_bg)
    protos = []
    for (k, offset), assign, raw in zip(((k_fg, 0), (k_bg, k_fg)), assigns, raws):
        part_means = means[:, offset:offset + k]
        # with no more tokens than clusters the tokens themselves are the prototypes (no eps)
        if bool(raw.any()):
            part_means = torch.where(raw.view(B, 1, 1), _clustered_tokens(maps, assign, k), part_means)
        protos.append(part_means)
    count = torch.cat(counts, 1)
    prototypes = torch.cat(protos, 1) * (count > 0).unsqueeze(-1)
    valid = count > 0
    if normalize:
        prototypes = F.normalize(prototypes, dim=-1)
    return prototypes, valid


def _token_sets(masks: torch.Tensor, valid: Optional[torch.Tensor], size, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(fg, bg) token sets (B, K, h, w) bool of :func:`support_prototypes` (shared with its reference)."""
    m = F.interpolate(masks.to(dtype), size=size, mode="bilinear", align_corners=True) >= 0.5
    fg, bg = _with_fallbacks(m)
    if valid is None:
        return fg, bg
    if valid.dtype != torch.bool or valid.shape[:2] != masks.shape[:2] or valid.dim() != 4:
        raise ValueError(f"support_prototypes: valid must be a bool (B, K, H, W) tensor of masks' B, K "
                         f"{tuple(masks.shape[:2])}, got {valid.dtype} of shape {tuple(valid.shape)}")
    if valid.shape[-2:] != tuple(size):
        valid = F.interpolate(valid.float(), size=size, mode="nearest") > 0
    return fg & valid, bg & valid


def _clustered_tokens(maps: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k, C): the token of maps (B, K, C, M) assigned to each cluster (the last one if
    several, token 0 if none); used where every token is its own cluster."""
    B, K, _, M = maps.shape
    order = torch.where(assign >= 0, assign, torch.full_like(assign, k))
    slot = torch.zeros(B, k + 1, dtype=torch.long, device=maps.device)
    slot.scatter_(1, order, torch.arange(K * M, device=maps.device).expand(B, -1))
    token = slot[:, :k]
    return maps[torch.arange(B, device=maps.device).view(B, 1), token // M, :, token % M]


def _with_fallbacks(fg: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """UMTFSS's fallbacks, per shot as the code's ``get_supp_flatten_input`` applies them: a shot
    without foreground gives its centre 2x2 tokens, a shot without background its 4 corners."""
    B, K, h, w = fg.shape
    flat = fg.flatten(2)
    if bool((flat.any(2) & ~flat.all(2)).all()):  # every shot has both: no fallback
        return fg, ~fg
    centre = torch.zeros(h, w, dtype=torch.bool, device=fg.device)
    centre[max(h // 2 - 1, 0):h // 2 + 1, max(w // 2 - 1, 0):w // 2 + 1] = True
    corners = torch.zeros(h, w, dtype=torch.bool, device=fg.device)
    corners[[0, 0, -1, -1], [0, -1, 0, -1]] = True
    no_fg = ~fg.flatten(2).any(2).view(B, K, 1, 1)
    fg = torch.where(no_fg, centre.expand_as(fg), fg)
    bg = ~fg
    no_bg = ~bg.flatten(2).any(2).view(B, K, 1, 1)
    bg = torch.where(no_bg, corners.expand_as(bg), bg)
    fg = fg & ~(no_bg & corners)
    return fg, bg


@torch.library.register_fake("fsskern::lsh_hash")
def _(x, planes):
    torch._check(x.dim() in (2, 3) and planes.dim() == 2,
                 lambda: "lsh_hash: x (N, E) or (M, N, E), planes (bits, E + 1)")
    # Fakes mirror the kernels' device checks: a meta tensor beside a real one dispatches here, not to a kernel.
    torch._check(planes.device == x.device, lambda: f"lsh_hash: x and planes must be on one device, got {x.device} "
                 f"and {planes.device}")
    return x.new_empty(x.shape[:-1], dtype=torch.int64)


@torch.library.register_fake("fsskern::hamming_kmeans")
def _(codes, valid, init, k, iters):
    torch._check(valid.device == codes.device and init.device == codes.device,
                 lambda: "hamming_kmeans: codes, valid and init must be on one device")
    torch._check(codes.dim() == 2 and valid.shape == codes.shape and tuple(init.shape) == (codes.shape[0], k),
                 lambda: "hamming_kmeans: codes (B, N), valid of the shape of codes, init (B, k)")
    B = codes.shape[0]
    return codes.new_empty(codes.shape), codes.new_empty(B, k), codes.new_empty(B, k)


@torch.library.register_fake("fsskern::cluster_means")
def _(features, assign, k, eps):
    torch._check(features.dim() in (3, 4), lambda: "cluster_means: features must be (B, N, C) or (B, S, C, M)")
    torch._check(assign.device == features.device, lambda: "cluster_means: features and assign must be on one device")
    N = features.shape[1] if features.dim() == 3 else features.shape[1] * features.shape[3]
    torch._check(tuple(assign.shape) == (features.shape[0], N), lambda: "cluster_means: assign must be (B, N)")
    B, C = features.shape[0], features.shape[2]
    return features.new_empty(B, k, C), assign.new_empty(B, k)


@torch.library.register_fake("fsskern::_cluster_means_backward")
def _(grad_means, features, assign, counts, eps):
    return features.new_empty(features.shape)


def _setup_context(ctx, inputs, output):
    features, assign, k, eps = inputs
    _, counts = output
    ctx.eps = eps
    ctx.mark_non_differentiable(counts)
    ctx.save_for_backward(features, assign, counts)


def _backward(ctx, grad_means, grad_counts):
    features, assign, counts = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.fsskern._cluster_means_backward(grad_means, features, assign, counts, ctx.eps)
    return grad, None, None, None


torch.library.register_autograd("fsskern::cluster_means", _backward, setup_context=_setup_context)
cast_inputs_under_autocast("lsh_hash", keep=(1,))  # the planes stay float32
