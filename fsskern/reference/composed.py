"""References of the two composite ops, built from the reference pieces, for ``get_backend("reference")``.

``class_prototypes`` pools one mask per class with the repository code of the chosen convention (POPNet's
one-hot matmul for "nearest"); ``support_prototypes`` is UMTFSS's pipeline (hash, Hamming k-means, cluster
means) on materialised tokens. The random draws (hyperplanes, k-means starts) and UMTFSS's fallbacks are taken
from :mod:`fsskern.ops.clustering` (plain torch, no kernel), so with the same generator both backends cluster
the same tokens the same way.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..ops.clustering import _token_sets, draw_init, lsh_planes
from . import clustering
from .masked_average_pool import class_prototypes_popnet, masked_average_pool


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, ignore_index: int = 255,
                     resize: str = "mask", eps: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`fsskern.ops.class_prototypes`: (B, num_classes, C) prototypes and (B, num_classes)
    areas: the full-resolution mask area ("features"), the area of the bilinearly resized mask ("mask") or the
    pixel count at the feature grid ("nearest"). Areas are float32 (float64 for float64 features), as the op's:
    in bf16 / fp16 a count above 256 / 2048 would round, and the counts weight a class over several supports."""
    opmath = torch.float64 if features.dtype == torch.float64 else torch.float32
    if resize == "nearest" and eps is None:
        prototypes, counts = class_prototypes_popnet(features, labels, num_classes, ignore_index)
        return prototypes, counts.to(opmath)
    if resize == "nearest":
        labels = F.interpolate(labels[:, None].double(), size=features.shape[-2:], mode="nearest")[:, 0].long()
        resize = "mask"
    masks = torch.stack([(labels == c) & (labels != ignore_index) for c in range(num_classes)], 1).to(features.dtype)
    prototypes = masked_average_pool(features, masks, resize, eps)
    if resize == "mask" and masks.shape[-2:] != features.shape[-2:]:
        masks = F.interpolate(masks, size=features.shape[-2:], mode="bilinear", align_corners=True)
    return prototypes, masks.sum((2, 3), dtype=opmath)


def support_prototypes(features: torch.Tensor, masks: torch.Tensor, *, valid: Optional[torch.Tensor] = None,
                       k_fg: int = 20, k_bg: int = 50, bits: int = 32, iters: int = 10,
                       generator: Optional[torch.Generator] = None,
                       normalize: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`fsskern.ops.support_prototypes`: features (B, K, C, h, w) permuted to tokens
    (B, K*h*w, C) as UMTFSS does, hashed in float64 (the kernels' fp32 hash agrees with exact projections),
    clustered per image with one-hot matmul means; tokens outside ``valid`` dropped from both sets. Returns
    prototypes (B, k_fg + k_bg, C) and valid. Everything runs on the features' device, as UMTFSS clusters on
    its GPU; the random draws come from ``generator`` on the CPU, so they are the same on every device."""
    B, K, C, h, w = features.shape
    # as the fused op: masks resized and planes drawn in float32 for half features (bf16 planes hash otherwise)
    wide = torch.float64 if features.dtype == torch.float64 else torch.float32
    fg, bg = _token_sets(masks, None, (h, w), wide)
    if valid is not None:  # UMTFSS: the padding mask resized nearest, padded tokens dropped from both sets
        keep = F.interpolate(valid.float(), size=(h, w), mode="nearest") > 0
        fg, bg = fg & keep, bg & keep
    tokens = features.permute(0, 1, 3, 4, 2).reshape(B, K * h * w, C)  # -1 cannot be inferred at B = 0
    planes = lsh_planes(bits, C, generator=generator, dtype=wide, device=features.device)
    codes = clustering.lsh_hash(clustering.autocast_rounded(tokens.detach()).double(), planes.double())
    out, valids = [], []
    for k, part in ((k_fg, fg.reshape(B, K * h * w)), (k_bg, bg.reshape(B, K * h * w))):
        assign, _, counts = clustering.hamming_kmeans(codes, k, iters, part, draw_init(part, k, generator))
        means, _ = clustering.cluster_means(tokens, assign, k)
        for b in range(B):
            if part[b].sum() <= k:  # no more tokens than clusters: the tokens are the prototypes
                idx = part[b].nonzero().flatten()
                means[b] = 0
                means[b, :len(idx)] = tokens[b, idx]
        out.append(means * (counts > 0).unsqueeze(-1))
        valids.append(counts > 0)
    prototypes = torch.cat(out, 1)
    return (F.normalize(prototypes, dim=-1) if normalize else prototypes), torch.cat(valids, 1)


def max_cosine(query: torch.Tensor, support: torch.Tensor, support_weights: torch.Tensor, *,
               eps: float = 1e-7, search_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of :func:`fsskern.ops.max_cosine`: PFENet's dense cosine of the query with the masked support
    (B, K, Ns, Nq), max over support pixels. Indices are -1 where the maximum falls on a zero-weight pixel.
    ``search_dtype`` is accepted for the fused signature: this dense search is exact already."""
    masked = support * support_weights.unsqueeze(2)  # (B, K, C, Ns)
    cos = torch.einsum("bkcs,bcq->bksq", masked, query) / (
        masked.norm(dim=2).unsqueeze(-1) * query.norm(dim=1)[:, None, None] + eps)
    values, indices = cos.max(2)
    weight_at_max = support_weights.gather(2, indices)
    return values, torch.where(weight_at_max == 0, torch.full_like(indices, -1), indices)
