"""Drop-in methods for PANet-style code (PANet, DPCL, PPNet's PANet baseline and other copies of ``FewShotSeg``;
not PPNet's ``FewShotSegPart``, whose getFeatures aligns corners and whose calDist / alignLoss use part prototypes).

Mirrors kaixin96/PANet ``models/fewshot.py`` at commit 1c8ae0ef (the version the code index holds;
the project's survey names 1695bf37, not compared): ``FewShotSeg.getFeatures``, ``getPrototype``, ``calDist`` and
``alignLoss``. They are methods there; here they are plain functions with the same arguments
minus ``self``, so one assignment per instance swaps them in:

    model.getFeatures = fsskern.compat.panet.getFeatures     # or: fsskern.compat.panet.patch(model)

Re-implemented on fsskern ops; no code copied.
"""
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import ops

PANET_EPS = 1e-5  # added to the mask area in getFeatures and alignLoss


def getFeatures(fts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: N802 (their name)
    """PANet's masked average pooling: features upsampled bilinear (align_corners=False) to the
    mask, ``sum(f * m) / (sum(m) + 1e-5)``; the upsampled features are never built.

    Args:
        fts: (B, C, h, w) features (PANet passes B = 1).
        mask: (B, H, W) float mask at image size (PANet's fore_mask / back_mask).

    Returns:
        (B, C), differentiable w.r.t. fts and a float mask. Equal to PANet's within fp32 rounding.

    Not reproduced: PANet's ``mask[None, ...]`` broadcast only pools correctly at B = 1; here each
    image is pooled with its own mask for any B.
    """
    if mask.dim() != 3:
        raise ValueError(f"getFeatures: mask must be (B, H, W), got {tuple(mask.shape)}")
    # a copy (the op saves its output for backward), so the caller may update it in place as PANet's may
    return ops.masked_average_pool(fts, mask.unsqueeze(1), resize="features", eps=PANET_EPS)[:, 0].clone()


def getPrototype(fg_fts: Sequence[Sequence[torch.Tensor]],  # noqa: N802 (their name)
                 bg_fts: Sequence[Sequence[torch.Tensor]]) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """PANet's prototypes: per way the mean of its shots' foreground features; one background
    prototype, the mean over ways of each way's shot mean. Inputs way x shot x [1 x C].

    Sums run in PANet's order (Python ``sum`` from 0, then the division), so the numbers are
    identical; nothing here is heavy enough to fuse.
    """
    n_ways, n_shots = len(fg_fts), len(fg_fts[0])
    fg_prototypes = [sum(way) / n_shots for way in fg_fts]
    bg_prototype = sum(sum(way) / n_shots for way in bg_fts) / n_ways
    return fg_prototypes, bg_prototype


def calDist(fts: torch.Tensor, prototype: torch.Tensor, scaler: float = 20) -> torch.Tensor:  # noqa: N802
    """Scaled cosine between each pixel and one prototype: ``cos(fts, prototype) * scaler``.

    Args:
        fts: (N, C, H, W); prototype: (1, C) or (N, C), or (C,) (PANet's broadcast takes it too).

    Returns:
        (N, H, W). One channel contraction and the pixel norms; unlike
        ``F.cosine_similarity`` no normalised (N, C, H, W) copy of the features is made. Norms
        are clamped to at least 1e-8 each, as torch's cosine_similarity does; equal to PANet's
        within fp32 rounding, gradients included. fp16/bf16 inputs are computed in fp32 (an
        fp32 copy of the features): an fp16 dot or norm product of ordinary features passes
        65504 and the division gives NaN where torch's normalise-first cosine does not. The result
        has the inputs' dtype, or fp32 under autocast, whose fp32 list holds cosine_similarity.
    """
    if prototype.dim() == 1:
        prototype = prototype[None]
    dtype = torch.promote_types(fts.dtype, prototype.dtype)
    out_dtype = torch.float32 if torch.is_autocast_enabled(fts.device.type) else dtype
    opmath = torch.promote_types(dtype, torch.float32)
    with torch.autocast(fts.device.type, enabled=False):  # autocast would run the contraction in low precision
        fts, prototype = fts.to(opmath), prototype.to(opmath)
        dots = torch.einsum("nchw,nc->nhw", fts, prototype.expand(fts.shape[0], -1))
        fts_norm = torch.linalg.vector_norm(fts, dim=1).clamp_min(1e-8)
        proto_norm = torch.linalg.vector_norm(prototype, dim=1).clamp_min(1e-8)
        return (dots / (fts_norm * proto_norm.view(-1, 1, 1)) * scaler).to(out_dtype)


def alignLoss(qry_fts: torch.Tensor, pred: torch.Tensor, supp_fts: torch.Tensor, fore_mask: torch.Tensor,
              back_mask: torch.Tensor) -> torch.Tensor:  # noqa: N802 (their name)
    """PANet's prototype alignment loss, its query-prototype step fused.

    Args:
        qry_fts: (N, C, h, w) query features; pred: (N, 1 + Wa, h, w) scores on the feature grid;
        supp_fts: (Wa, Sh, C, h, w); fore_mask / back_mask: (Wa, Sh, H, W) float masks.

    Returns:
        scalar loss (0 when every way is missing from the prediction), as PANet computes it:
        query prototypes of the argmax classes pooled over all N queries,
        ``sum / (count + 1e-5)``; ways absent from the prediction skipped; per shot the support
        scored against (background, way) query prototypes with ``calDist``, upsampled bilinear
        (align_corners=False) to the mask, cross-entropy against the support label (1 fore,
        0 back, 255 elsewhere), divided by shots and ways.
    """
    n_ways, n_shots = len(fore_mask), len(fore_mask[0])
    labels = pred.argmax(dim=1)  # (N, h, w)
    protos, counts = ops.class_prototypes(qry_fts, labels, 1 + n_ways, resize="mask", eps=PANET_EPS)
    # PANet's float mask makes its query prototypes, and so the scores and the loss, float32 at least: in fp16 a
    # class's sum over 2 x 53 x 53 pixels, or the cross-entropy's over the support mask, passes 65504
    protos = protos.to(torch.promote_types(protos.dtype, torch.float32))
    if qry_fts.shape[0] > 1:  # PANet pools over the queries too: combine the per-query sums
        sums = (protos * (counts + PANET_EPS).unsqueeze(-1).to(protos.dtype)).sum(0)
        qry_prototypes = sums / (counts.sum(0) + PANET_EPS).unsqueeze(-1).to(protos.dtype)
        total = counts.sum(0)
    else:
        qry_prototypes, total = protos[0], counts[0]
    loss = 0
    for way in range(n_ways):
        if total[way + 1] == 0:
            continue
        prototypes = [qry_prototypes[[0]], qry_prototypes[[way + 1]]]
        for shot in range(n_shots):
            img_fts = supp_fts[way, [shot]]
            supp_pred = torch.stack([calDist(img_fts, p) for p in prototypes], dim=1)
            supp_pred = F.interpolate(supp_pred, size=fore_mask.shape[-2:], mode="bilinear")
            supp_label = torch.full_like(fore_mask[way, shot], 255, dtype=torch.long)
            supp_label[fore_mask[way, shot] == 1] = 1
            supp_label[back_mask[way, shot] == 1] = 0
            loss = loss + F.cross_entropy(supp_pred, supp_label[None], ignore_index=255) / n_shots / n_ways
    return loss


def patch(model) -> None:
    """Swap the four methods of a PANet ``FewShotSeg`` instance for these functions."""
    model.getFeatures = getFeatures
    model.getPrototype = getPrototype
    model.calDist = calDist
    model.alignLoss = alignLoss
