"""Masked average pooling as PFENet/BAM (Weighted_GAP), PANet/DPCL and POPNet write it."""
import torch
import torch.nn.functional as F


def weighted_gap(supp_feat: torch.Tensor, mask: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """PFENet/BAM ``Weighted_GAP``: supp_feat (B, C, h, w), mask (B, 1, H, W) -> (B, C, 1, 1)."""
    mask = F.interpolate(mask, size=supp_feat.shape[-2:], mode="bilinear", align_corners=True)
    supp_feat = supp_feat * mask
    feat_h, feat_w = supp_feat.shape[-2:][0], supp_feat.shape[-2:][1]
    area = F.avg_pool2d(mask, (supp_feat.size()[2], supp_feat.size()[3])) * feat_h * feat_w + eps
    supp_feat = F.avg_pool2d(input=supp_feat, kernel_size=supp_feat.shape[-2:]) * feat_h * feat_w / area
    return supp_feat


def panet_masked_average_pool(fts: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """PANet ``getFeatures``: fts (B, C, h, w) upsampled to the mask, mask (B, H, W) -> (B, C)."""
    fts = F.interpolate(fts, size=mask.shape[-2:], mode="bilinear")
    masked_fts = torch.sum(fts * mask[:, None, ...], dim=(2, 3)) / (mask[:, None, ...].sum(dim=(2, 3)) + eps)
    return masked_fts


def class_prototypes_popnet(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                            ignore_index: int = 255):
    """POPNet: labels resized nearest to the features, one-hot, divided by the count (0 -> 1),
    one matmul. Returns (B, num_classes, C) and the integer pixel counts (B, num_classes)."""
    B, C, h, w = features.shape
    labels = F.interpolate(labels[:, None].double(), size=(h, w), mode="nearest")[:, 0].long()
    labels = torch.where(labels == ignore_index, torch.full_like(labels, num_classes), labels)
    onehot = F.one_hot(labels.view(B, -1), num_classes + 1)[..., :num_classes]  # (B, hw, K)
    counts = onehot.sum(1)  # (B, K), integers: a bf16 / fp16 sum would round counts above 256 / 2048
    onehot = onehot.to(features.dtype) / counts.clamp(min=1).unsqueeze(1).to(features.dtype)
    return torch.bmm(onehot.transpose(1, 2), features.view(B, C, h * w).transpose(1, 2)), counts


def masked_average_pool(features: torch.Tensor, masks: torch.Tensor, resize: str = "mask", eps=None) -> torch.Tensor:
    """The reference of :func:`fsskern.ops.masked_average_pool`: masks (B, N, H, W) pooled one
    at a time with the repository code of the chosen convention -> (B, N, C)."""
    masks = masks.to(features.dtype)
    protos = []
    for n in range(masks.shape[1]):
        if resize == "mask":
            protos.append(weighted_gap(features, masks[:, n:n + 1], 5e-4 if eps is None else eps).flatten(1))
        elif resize == "features":
            protos.append(panet_masked_average_pool(features, masks[:, n], 1e-5 if eps is None else eps))
        else:
            raise ValueError(f"unknown resize {resize!r}")
    return torch.stack(protos, 1)
