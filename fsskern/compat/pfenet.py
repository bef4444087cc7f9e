"""Drop-in functions for PFENet-derived code: PFENet, BAM, CyCTR, UMTFSS, HDMNet, MSANet.

Mirrors (read at these commits; the functions are re-implemented on fsskern ops, no code copied):
- dvlab-research/PFENet ``model/PFENet.py`` at commit f4f5560c (the version the code index holds;
  the project's survey names a5056754, not compared): ``Weighted_GAP`` and the prior block of
  ``PFENet.forward`` ("corr_query_mask").
- chunbolang/BAM ``model/BAM.py`` at 958e58a8 (survey: c0f935c3): the same ``Weighted_GAP``, and the prior weighted by
  ``weight_soft`` (the ``if self.shot > 1`` K-shot re-weighting) instead of the plain mean.
- CyCTR-Pytorch, HDMNet and MSANet (BAM-based) define ``Weighted_GAP`` as PFENet does (seen by
  code search); their prior blocks, and UMTFSS's, follow PFENet's formula according to
  ../shared/notes/reference-conventions.md; they were not re-read line by line here.

Use: ``from fsskern.compat.pfenet import Weighted_GAP`` in place of the model file's own
definition; replace the prior loop of ``forward`` by one ``corr_query_mask(...)`` call.
"""
from typing import Optional, Sequence, Union

import torch

from .. import ops

WEIGHTED_GAP_EPS = 0.0005  # added to the mask area, as in PFENet


def Weighted_GAP(supp_feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # noqa: N802 (their name)
    """PFENet's masked average pooling: ``sum(f * m) / (sum(m) + 0.0005)`` per image.

    Args:
        supp_feat: (B, C, h, w) support features.
        mask: (B, 1, h, w) float mask on the feature grid (PFENet resizes it bilinear,
            align_corners=True, before the call; the ignore label 255 is already background
            because the caller builds it as ``(s_y == 1).float()``).

    Returns:
        (B, C, 1, 1) prototypes, differentiable w.r.t. both inputs, equal to PFENet's within
        fp32 rounding (PFENet computes the sums as ``avg_pool2d(...) * h * w``).

    Not reproduced: a mask of another spatial size (PFENet's broadcast fails) is resized
    bilinear, align_corners=True, to (h, w) here, the resize PFENet's callers apply.
    """
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"Weighted_GAP: mask must be (B, 1, h, w), got {tuple(mask.shape)}")
    B, C = supp_feat.shape[:2]
    # a copy, not a view of the op's output (saved for its backward): PFENet's k-shot code adds into the
    # returned tensor in place (supp_feat += ...), which would otherwise fail in backward
    return ops.masked_average_pool(supp_feat, mask, resize="mask", eps=WEIGHTED_GAP_EPS).view(B, C, 1, 1).clone()


def corr_query_mask(query_feat_4: torch.Tensor, final_supp_list: Sequence[torch.Tensor],
                    mask_list: Sequence[torch.Tensor], resize_size: Union[int, Sequence[int]],
                    cosine_eps: float = 1e-7, weight_soft: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The prior block of PFENet/BAM ``forward``, fused: the (HWs x HWq) similarity never exists.

    Args:
        query_feat_4: (B, C, h, w) query layer4 features.
        final_supp_list: one (B, C, hs, ws) support layer4 map per shot (PFENet's ``final_supp_list``).
        mask_list: one (B, 1, H, W) float support mask per shot at image size (PFENet's ``mask_list``,
            ``(s_y[:, i] == 1).float()``: 255 counts as background); resized bilinear,
            align_corners=True, to (hs, ws) as in PFENet.
        resize_size: the size each shot's prior is resized to (bilinear, align_corners=True);
            PFENet passes ``(query_feat_3.size(2), query_feat_3.size(3))``.
        cosine_eps: PFENet's ``cosine_eps``, added to the product of the norms and to the
            min-max denominator.
        weight_soft: None for PFENet (mean over shots), or BAM's (B, shot, 1, 1) ``weight_soft``:
            the priors are summed with these weights (BAM's 1-shot weight is 1).

    Returns:
        (B, 1, *resize_size) ``corr_query_mask`` in the query features' dtype (the op computes
        fp16/bf16 in fp32; PFENet concatenates the prior with its features, so a float32 prior
        would promote a half model's conv input). Differentiable w.r.t. the features (PFENet
        runs the block on no-grad features; gradients to the masks are refused).

    Not reproduced: PFENet/BAM assume square maps (``view(bsize, sp_sz * sp_sz)``) and fail
    otherwise; non-square maps work here. The trailing identity resize of PFENet's block (to
    the query_feat size, which equals resize_size) is left to the caller.
    """
    if len(final_supp_list) != len(mask_list) or not final_supp_list:
        raise ValueError(f"corr_query_mask: need one mask per support map, got {len(final_supp_list)} maps and "
                         f"{len(mask_list)} masks")
    size = (resize_size, resize_size) if isinstance(resize_size, int) else tuple(resize_size)
    # one op call per shot: stacking the shots' layer4 maps would copy them (150 MB at BAM 5-shot)
    priors = torch.cat([ops.prior_mask(query_feat_4, supp.unsqueeze(1), mask.to(query_feat_4.dtype), eps=cosine_eps,
                                       reduce=None, out_size=size)
                        for supp, mask in zip(final_supp_list, mask_list)], 1)
    prior = priors.mean(1, keepdim=True) if weight_soft is None else (weight_soft * priors).sum(1, keepdim=True)
    return prior.to(query_feat_4.dtype)
