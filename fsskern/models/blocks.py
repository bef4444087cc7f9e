"""Blocks that more than one method uses, written once."""
import torch
import torch.nn.functional as F
from torch import nn

# The logit of a class the support does not annotate (POPNet R8, the baseline's k-way pairs): exp underflows to 0
# in fp32/bf16/fp16, and it stays finite, since bilinear resizing of -inf gives NaN.
ABSENT = -1e4
IGNORE = 255  # the ignore label of every mask (docs/architecture.md)


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor, scale: float = 20.0, eps: float = 1e-8):
    """Non-parametric cosine segmentation (PANet ``calDist``, the training-free baseline, POPNet's NCM).

    features (B, C, h, w), prototypes (B, P, C) -> (B, P, h, w): ``scale * cos(feature, prototype)``,
    PANet's alpha = 20. Each side is normalised with ``eps`` as ``F.cosine_similarity`` does, but
    as one batched product: the (B, P, C, h, w) broadcast of ``cosine_similarity`` is never built.
    """
    f = F.normalize(features, dim=1, eps=eps)
    p = F.normalize(prototypes, dim=2, eps=eps)
    return scale * torch.einsum("bpc,bchw->bphw", p, f)


def check_one_way_batch(name: str, batch: dict, training: bool, same_size: str = ""):
    """The 1-way episode batch (docs/architecture.md) a method reads, checked once for all methods; returns
    (query_img, support_imgs, support_masks). ``same_size``: why the method needs query and supports at one
    size (empty: it does not)."""
    query, supports, masks = batch["query_img"], batch["support_imgs"], batch["support_masks"]
    if query.dim() != 4 or supports.dim() != 5 or masks.dim() != 4:
        raise ValueError(f"{name}: expected query_img (B, 3, H, W), support_imgs (B, K, 3, H, W), support_masks "
                         f"(B, K, H, W); got {tuple(query.shape)}, {tuple(supports.shape)}, {tuple(masks.shape)}")
    if masks.shape != supports.shape[:2] + supports.shape[-2:] or supports.shape[0] != query.shape[0]:
        raise ValueError(f"{name}: support_masks {tuple(masks.shape)} do not match support_imgs "
                         f"{tuple(supports.shape)} and query_img {tuple(query.shape)} (one mask per shot)")
    if supports.shape[1] == 0:
        raise ValueError(f"{name}: the batch has no support image (K = 0)")
    check_labels(name, "support_masks", masks)
    if same_size and supports.shape[-2:] != query.shape[-2:]:
        raise ValueError(f"{name}: query and support images must share one size ({same_size}); got "
                         f"{tuple(query.shape[-2:])} and {tuple(supports.shape[-2:])}")
    if "classes" in batch and batch["classes"].shape[-1] != 1:
        raise ValueError(f"{name}: 1-way episodes only, the batch has {batch['classes'].shape[-1]} ways")
    expected = (query.shape[0],) + tuple(query.shape[-2:])
    got = tuple(batch["query_mask"].shape) if "query_mask" in batch else None
    if training and got != expected:
        raise ValueError(f"{name}: training needs query_mask; query_mask must be (B, H, W) = {expected}, got {got}")
    if training:  # the loss's target: another value would be a class index out of range (a device-side assert)
        check_labels(name, "query_mask", batch["query_mask"])
    return query, supports, masks


def check_labels(name: str, key: str, mask: torch.Tensor, top: int = 1) -> None:
    """An episode mask holds 0 (background), 1..top (the episode's ways; a support mask: 1, its way) and 255
    (ignored) only: a label map of dataset class ids would otherwise read as a support without foreground, or
    as a query target out of range (on CUDA a device-side assert)."""
    bad = ((mask < 0) | (mask > top)) & (mask != IGNORE)
    if bad.any():
        raise ValueError(f"{name}: {key} must hold 0..{top} or {IGNORE}; found {mask[bad].unique()[:8].tolist()}")


def _conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int, norm):
    """Conv -> [norm] -> ReLU. Without a norm the conv has a bias (BAM's ASPP); with one it has none."""
    padding = dilation * (kernel_size - 1) // 2
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=norm is None)
    layers = [conv] if norm is None else [conv, norm(out_channels)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True))


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLab v3; BAM ``model/ASPP.py`` layout and init by default).

    Branches, in this order: image pooling (global average -> 1x1 conv -> broadcast), a 1x1 conv,
    and one 3x3 conv per dilation; each branch is conv -> [norm] -> ReLU. The branches are
    concatenated without a projection, so (B, in_channels, h, w) -> (B, out_channels * (2 +
    len(dilations)), h, w); a method that wants DeepLab's projection adds its own 1x1 conv.

    Args:
        in_channels, out_channels: per-branch widths (BAM: 256 -> 256, output 1280).
        dilations: of the 3x3 branches (BAM: 6, 12, 18 at output stride 8; DeepLab v3 takes 6, 12, 18 at
            output stride 16 and 12, 24, 36 at 8).
        norm: None (BAM: convs with bias, no normalisation) or a layer class such as
            ``nn.BatchNorm2d`` (DeepLab: convs without bias, then the norm; its image-pooling branch then cannot
            train on a batch of 1, as in DeepLab's code).
        image_pool: include the image-pooling branch, first in the concatenation (BAM's order; DeepLab's last).
    Conv weights are kaiming-normal (fan-in, as BAM's ``_init_weight``); biases keep PyTorch's init.
    """

    def __init__(self, in_channels: int, out_channels: int = 256, dilations=(6, 12, 18), norm=None,
                 image_pool: bool = True):
        super().__init__()
        self.pool = _conv_norm_relu(in_channels, out_channels, 1, 1, norm) if image_pool else None
        self.branches = nn.ModuleList([_conv_norm_relu(in_channels, out_channels, 1, 1, norm)] +
                                      [_conv_norm_relu(in_channels, out_channels, 3, d, norm) for d in dilations])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = [branch(x) for branch in self.branches]
        if self.pool is not None:
            pooled = self.pool(x.mean((2, 3), keepdim=True))
            out.insert(0, pooled.expand(-1, -1, *x.shape[-2:]))
        return torch.cat(out, 1)


class PPM(nn.Module):
    """Pyramid pooling module (PSPNet; BAM ``model/PPM.py`` layout).

    For each bin b: adaptive average pool to b x b -> 1x1 conv (no bias) -> norm -> ReLU ->
    bilinear upsample (align_corners=True) to the input size; the input and all bins are
    concatenated: (B, C, h, w) -> (B, C + len(bins) * reduction, h, w). PSPNet uses
    reduction = C / len(bins), so the output has 2C channels (ResNet-50: 2048 -> 4096).

    Args:
        in_channels, reduction: input width and per-bin width.
        bins: pooled grid sizes (PSPNet: 1, 2, 3, 6).
        norm: normalisation layer class (PSPNet: BatchNorm2d).
    """

    def __init__(self, in_channels: int, reduction: int, bins=(1, 2, 3, 6), norm=nn.BatchNorm2d):
        super().__init__()
        self.stages = nn.ModuleList(nn.Sequential(
            nn.AdaptiveAvgPool2d(b), nn.Conv2d(in_channels, reduction, 1, bias=False), norm(reduction),
            nn.ReLU(inplace=True)) for b in bins)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        return torch.cat([x] + [F.interpolate(stage(x), size, mode="bilinear", align_corners=True)
                                for stage in self.stages], 1)
