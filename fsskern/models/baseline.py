"""The training-free prototype baseline every trained method must beat.

PANet without training (Wang et al., ICCV 2019, §3.2-3.3): a frozen ImageNet backbone, one
foreground and one background prototype per support by masked average pooling (PANet's
convention: features at their own resolution, the mask pushed through the transposed
interpolation, ``resize="features"``), prototypes averaged over the shots, and a non-parametric
cosine segmentation (alpha = 20). Ignore pixels (255) belong to neither prototype.

params: ``layers`` (backbone outputs concatenated after resizing to the first one's grid; default
``[layer3, layer4]``), ``scale`` (alpha, 20).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import create_backbone, freeze
from .blocks import cosine_logits
from .registry import register_model
from .params import parse_params


@register_model("baseline")
class PrototypeBaseline(nn.Module):
    DEFAULTS = {"layers": ["layer3", "layer4"], "scale": 20.0}

    def __init__(self, cfg, backend):
        super().__init__()
        self.params = parse_params("baseline", cfg.params, self.DEFAULTS)
        self.backend = backend
        self.backbone = create_backbone(cfg.backbone, weights=cfg.weights)
        freeze(self.backbone)  # training-free: nothing here learns, whatever the config says

    def features(self, images: torch.Tensor) -> torch.Tensor:
        outs = self.backbone(images)
        layers = [outs[name] for name in self.params["layers"]]
        size = layers[0].shape[-2:]
        return torch.cat([x if x.shape[-2:] == size else
                          F.interpolate(x, size=size, mode="bilinear", align_corners=True) for x in layers], 1)

    def forward(self, batch: dict) -> dict:
        query, supports, masks = batch["query_img"], batch["support_imgs"], batch["support_masks"]
        B, S = masks.shape[:2]
        if supports.shape[:2] != (B, S) or masks.shape[-2:] != supports.shape[-2:]:
            raise ValueError(f"baseline: support images {tuple(supports.shape)} and masks {tuple(masks.shape)} "
                             f"do not match (expected (B, S, 3, H, W) and (B, S, H, W))")
        q = self.features(query)
        s = self.features(supports.flatten(0, 1))  # (B*S, C, h, w)
        fg_bg = torch.stack([masks == 1, masks == 0], 2).flatten(0, 1)  # (B*S, 2, H, W); 255 in neither
        protos = self.backend.masked_average_pool(s, fg_bg, resize="features")  # (B*S, 2, C)
        protos = protos.view(B, S, 2, -1).mean(1).flip(1)  # (B, [bg, fg], C), the mean over shots
        logits = cosine_logits(q, protos, scale=self.params["scale"])
        logits = F.interpolate(logits, size=query.shape[-2:], mode="bilinear", align_corners=True)
        return {"logits": logits, "losses": {}}
