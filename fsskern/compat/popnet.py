"""Drop-in per-class prototype pooling for POPNet and EOPNet (one-shot human parsing).

Mirrors Charleshhy/One-shot-Human-Parsing at commit 2ed721b2 (the version the code index holds;
the project's survey names 4df7ebff, not compared):
- ``networks/popnet.py``, ``popnet_kway_dp.forward``: the support mask resized nearest to the
  features, ``mask2map`` (per-class indicator divided by the class's pixel count, 0 replaced by
  1), one ``matmul`` -> ``sp_ave_features``: :func:`class_average_features` replaces the three.
- ``networks/eopnet.py``, ``EOPNet.get_static_prototypes(mask, features, class_num, plobs=True)``:
  :func:`get_static_prototypes`, assignable to an instance (``model.get_static_prototypes = ...``).

Both pool every class in one pass of fsskern's ``class_prototypes``, over a bool (B, classes, h, w) class map
where ``mask2map`` builds a float32 one. Re-implemented on fsskern ops; no code copied.
"""
import torch
import torch.nn.functional as F

from .. import ops

_NO_CLASS = -1  # labels outside [0, class_num) (255 included) belong to no class, as in mask2map


def _pool(features: torch.Tensor, labels: torch.Tensor, class_num: int) -> torch.Tensor:
    # mask2map compares exactly (mask == i): a fractional label (a bilinearly resized map) is in no class
    whole = labels == labels.round() if labels.is_floating_point() else torch.ones_like(labels, dtype=torch.bool)
    labels = labels.long()
    labels = torch.where(whole & (labels >= 0) & (labels < class_num), labels, torch.full_like(labels, _NO_CLASS))
    protos, _ = ops.class_prototypes(features, labels, class_num, ignore_index=_NO_CLASS, resize="nearest")
    return protos.clone()  # the op saves its output for backward: the caller may update this in place


def class_average_features(sup_features: torch.Tensor, support_mask: torch.Tensor, nclasses: int) -> torch.Tensor:
    """POPNet's ``sp_ave_features``: the mean support feature of every class.

    Args:
        sup_features: (B, C, h, w).
        support_mask: (B, 1, H, W) float label map (class ids; 255 or any id outside
            [0, nclasses) belongs to no class), resized nearest to (h, w) as POPNet does.
        nclasses: number of classes (POPNet's ``cate_num``).

    Returns:
        (B, nclasses, C), differentiable w.r.t. the features; an absent class gets a zero row.
        Equal to POPNet's within fp32 rounding (POPNet divides the indicator before the matmul).
    """
    if support_mask.dim() != 4 or support_mask.shape[1] != 1:
        raise ValueError(f"class_average_features: support_mask must be (B, 1, H, W), got {tuple(support_mask.shape)}")
    labels = F.interpolate(support_mask, size=sup_features.shape[-2:], mode="nearest")[:, 0]
    return _pool(sup_features, labels, nclasses)


def get_static_prototypes(mask: torch.Tensor, features: torch.Tensor, class_num: int,
                          plobs: bool = True) -> torch.Tensor:
    """EOPNet's class prototypes from a label map or class scores on the feature grid.

    Args:
        mask: (B, h, w) label map, or with ``plobs`` (B, class_num, h, w) scores whose argmax is
            the label.
        features: (B, C, h, w).

    Returns:
        (B, class_num, C) mean feature per class (zero row for an absent class).
    """
    labels = mask.argmax(1) if plobs else mask
    if labels.shape[-2:] != features.shape[-2:]:
        raise ValueError(f"get_static_prototypes: mask {tuple(mask.shape)} must be on the feature grid "
                         f"{tuple(features.shape[-2:])} (EOPNet resizes it before the call)")
    return _pool(features, labels, class_num)
