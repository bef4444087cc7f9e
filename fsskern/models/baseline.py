"""The training-free prototype baseline every trained method must beat.

PANet without training (Wang et al., ICCV 2019, §3.2-3.3): a frozen ImageNet backbone, one
foreground and one background prototype per support by masked average pooling (PANet's
convention: features at their own resolution, the mask pushed through the transposed
interpolation, ``resize="features"``), prototypes averaged over the shots, and a non-parametric
cosine segmentation (alpha = 20). Ignore pixels (255) belong to neither prototype. k-way episodes
(POPNet's parsing pairs, ``batch["classes"]`` with more than one way) get one prototype per way and one
background prototype (``_k_way``): the training-free baseline of POPNet's CCP recipe.

params: ``layers`` (backbone outputs concatenated after resizing to the first one's grid; default ``[layer2,
layer3]``, chosen on held-out base-class images of MSRC-v2 fold 0 with MobileNetV2: val mIoU 61.5 for layer2+3, 60.7
layer3, 59.5 layer3+4, 48.8 layer4, 300 episodes each; never on test classes), ``scale`` (alpha, 20), ``cache_mb``
(features of recently seen images kept, in MB; 0 turns the cache off), ``output_stride`` (None: the backbone's
default, 8 for MobileNetV2) and ``align_corners`` (True) of the layers' concatenation and the logits' upsampling
(the pooling's transposed interpolation is align_corners=False, as PANet's, whatever it says): on the same held-out
images output stride 32 gives 61.8 and align_corners=False 61.4, within the noise of 300 episodes, so the defaults
(and every figure made with them) stay.

Evaluation reads the same few hundred images in thousands of episodes, and a frozen backbone is a
pure function of its input, so the features of each input image are kept (keyed by a hash of its
bytes, least recently used dropped first): on MSRC-v2 this makes 3,000 episodes about 10x cheaper.
"""
import hashlib
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import create_backbone, freeze, require_backbone
from .blocks import ABSENT, check_labels, cosine_logits
from .registry import register_model
from .params import parse_params


@register_model("baseline")
class PrototypeBaseline(nn.Module):
    DEFAULTS = {"layers": ["layer2", "layer3"], "scale": 20.0, "cache_mb": 1024, "align_corners": True,
                "output_stride": None}

    def __init__(self, cfg, backend):
        super().__init__()
        self.params = parse_params("baseline", cfg.params, self.DEFAULTS)
        self.backend = backend
        require_backbone(cfg.backbone, "baseline")
        self.backbone = create_backbone(cfg.backbone, weights=cfg.weights, output_stride=self.params["output_stride"])
        freeze(self.backbone)  # training-free: nothing here learns, whatever the config says
        self.cache: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()
        self.cache_bytes = 0
        self.register_load_state_dict_post_hook(lambda module, _: module.clear_cache())  # new weights, new features

    def clear_cache(self) -> None:
        self.cache.clear()
        self.cache_bytes = 0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, C, h, w), from the cache where an identical image was seen."""
        if self.params["cache_mb"] <= 0:
            return self._features(images)
        # the device and the autocast dtype are part of the key: a model moved or run under autocast computes anew
        autocast = torch.get_autocast_dtype(images.device.type) if torch.is_autocast_enabled(images.device.type) \
            else None
        context = f"{images.device}|{autocast}".encode()
        keys = [hashlib.blake2b(img.detach().cpu().numpy().tobytes() + context, digest_size=16).digest()
                for img in images]
        found = {}  # this call's features, held here: storing the missing ones may evict a hit of this call
        for k in keys:
            if k in self.cache:
                self.cache.move_to_end(k)
                found[k] = self.cache[k]
        # the first of each image not cached yet: a k-way episode repeats its one support image once per way
        missing = list({k: i for i, k in reversed(list(enumerate(keys))) if k not in found}.values())
        if missing:
            for i, f in zip(missing, self._features(images[missing])):
                f = f.clone()  # a view would keep the whole batch's features alive past cache_mb
                found[keys[i]] = f
                self._remember(keys[i], f)
        return torch.stack([found[k] for k in keys])

    def _remember(self, key: bytes, feature: torch.Tensor) -> None:
        self.cache[key] = feature
        self.cache_bytes += feature.numel() * feature.element_size()
        while self.cache_bytes > self.params["cache_mb"] * 2 ** 20 and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= old.numel() * old.element_size()

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        outs = self.backbone(images, layers=self.params["layers"])
        layers = [outs[name] for name in self.params["layers"]]
        size = layers[0].shape[-2:]
        return torch.cat([x if x.shape[-2:] == size else
                          F.interpolate(x, size=size, mode="bilinear", align_corners=self.params["align_corners"])
                          for x in layers], 1)

    def forward(self, batch: dict) -> dict:
        query, supports, masks = batch["query_img"], batch["support_imgs"], batch["support_masks"]
        B, S = masks.shape[:2]
        if supports.shape[:2] != (B, S) or masks.shape[-2:] != supports.shape[-2:]:
            raise ValueError(f"baseline: support images {tuple(supports.shape)} and masks {tuple(masks.shape)} "
                             f"do not match (expected (B, S, 3, H, W) and (B, S, H, W))")
        check_labels("baseline", "support_masks", masks)  # class ids would pool into neither prototype
        q = self.features(query)
        s = self.features(supports.flatten(0, 1))  # (B*S, C, h, w)
        ways = batch["classes"].shape[1] if "classes" in batch else 1
        if ways > 1:
            return self._k_way(q, s, supports, masks, ways, query.shape[-2:])
        fg_bg = torch.stack([masks == 1, masks == 0], 2).flatten(0, 1)  # (B*S, 2, H, W); 255 in neither
        protos = self.backend.masked_average_pool(s, fg_bg, resize="features")  # (B*S, 2, C)
        protos = protos.view(B, S, 2, -1).mean(1).flip(1)  # (B, [bg, fg], C), the mean over shots
        logits = cosine_logits(q, protos, scale=self.params["scale"])
        logits = F.interpolate(logits, size=query.shape[-2:], mode="bilinear",
                               align_corners=self.params["align_corners"])
        return {"logits": logits, "losses": {}}

    def _k_way(self, q, s, supports, masks, ways: int, size) -> dict:
        """k-way episodes (POPNet's parsing pairs; slots way-major): one foreground prototype per way, the mean
        over its shots that hold it, and one background prototype. When every way reads the same support
        image (one-shot k-way parsing), background is what no way annotates there; otherwise each slot's
        0 pixels, as in the 1-way case. A way with no pixel in its supports cannot be predicted (logit
        ABSENT, as POPNet's classes absent from the support)."""
        B, S = masks.shape[:2]
        shots = S // ways
        if shots * ways != S:
            raise ValueError(f"baseline: {S} support slots is not a multiple of {ways} ways (slots are way-major)")
        # per episode, so that a batch's other episodes do not decide it
        shared = (supports == supports[:, :1]).flatten(1).all(1).view(B, 1, 1, 1)
        bg = torch.where(shared, (masks == 0).all(1, keepdim=True), masks == 0)
        fg_bg = torch.stack([masks == 1, bg], 2).flatten(0, 1)
        protos = self.backend.masked_average_pool(s, fg_bg, resize="features").view(B, ways, shots, 2, -1)
        held = (masks == 1).flatten(2).any(2).view(B, ways, shots, 1).to(protos.dtype)
        count = held.sum(2)  # (B, ways, 1)
        fg = (protos[..., 0, :] * held).sum(2) / count.clamp(min=1)
        logits = cosine_logits(q, torch.cat([protos[..., 1, :].mean((1, 2))[:, None], fg], 1), self.params["scale"])
        absent = F.pad(count[..., 0] == 0, (1, 0))  # background (channel 0) is always there
        logits = logits.masked_fill(absent[:, :, None, None], ABSENT)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=self.params["align_corners"])
        return {"logits": logits, "losses": {}}
