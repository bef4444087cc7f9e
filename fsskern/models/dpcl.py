"""DPCL (Kwon et al., "Dual Prototypical Contrastive Learning for Few-shot Semantic Segmentation") and the
PANet it is built on (Wang et al., ICCV 2019): one code path, ``contrastive=False`` is PANet.

Spec: ``../shared/papers/dpcl.txt`` and ``../shared/notes/methods/dpcl.md`` (section numbers below). There is
no public DPCL code; the PANet parts follow ``kaixin96/PANet`` (``models/fewshot.py``) and the ResNet-50
details ``Xiangyi1996/PPNet-PyTorch``, the augmentation ``facebookresearch/moco`` (v2 ``aug_plus``).

Forward (training adds the losses)::

    support + query images --encoder--> f (N, d, h, w): layer2/3/4 each projected to 512 by a 1x1 conv, concat
    f_s, support masks --backend.masked_average_pool(resize="features")--> P (B, 1 + ways, d)  [bg, way 1..n]
    f_q, P --cosine x 20 (blocks.cosine_logits)--> (B, 1 + ways, h, w) --bilinear--> logits (B, 1 + ways, H, W)
    losses: query   CE(logits, query_mask)                                         Eq. 4, first term
            align   PANet PAR: query prototypes from argmax (backend.class_prototypes) segment the supports
            cs_nce  0.02  * L_cs-NCE: p_c vs the momentum prototype of the augmented support and 7,000
                    dictionary keys of other classes (tau 0.05)                       Eq. 5
            ca_nce  0.015 * L_ca-NCE: p_c vs the momentum prototype of the augmented query's class and
                    1,000 means of 5 random background pixels                        Eq. 6

Conventions: logits channel 0 is background, channel n the episode's way n (the batch contract of
``docs/architecture.md``); support masks are 1 on the shot's class, 0 elsewhere, 255 ignore. Features and
prototypes are float32 (or the autocast dtype); the dictionary is float32.

Resolutions (source: paper = DPCL text, PANet / PPNet / MoCo = public code, notes = the method notes, ours):
- R1 encoder: ResNet-50 with torchvision's stem and ``replace_stride_with_dilation`` (output stride 8), the
  last ReLU of layer4 dropped, BN trained (PPNet; notes A2, A18; ``frozen_bn`` switches BN off). Each
  "one-layer MLP" is a 1x1 conv with bias, no activation (notes A3); concat order l2, l3, l4, d = 1536.
  Levels with a coarser stride are upsampled bilinear to the finest one after their head (ours, notes A2:
  MobileNetV2 and VGG; a 1x1 conv commutes with the interpolation, so projecting first is the same map).
  Heads start at PyTorch's conv init (ours, notes 2.3: DPCL has no public code); ``head_init="orthogonal"``
  makes each an isometry so that training starts from the backbone's cosines (ours; the MSRC-v2 CPU recipe).
- R2 prototypes (Eq. 1): features upsampled to the mask size, eps 1e-5, fg = mean over shots, one bg =
  mean over ways and shots; the support bg mask is "not this shot's class", 255 included (PANet
  ``getFeatures`` / ``getPrototype``; notes A16). N-way supports carry only their own class (batch
  contract), so another way's object in a support counts as its bg (ours). ``void_background=False`` leaves 255
  out of both prototypes, as the baseline does (ours; the MSRC-v2 CPU recipe, where void outlines every object).
  A way whose support foreground the resize removed (a one-pixel object under the test resize) gets the zero
  prototype, so a logit of 0 (PANet's eps and ``calDist``); at inference with a warning, not an error, so that
  one episode does not stop a 5 x 1,000-episode evaluation (ours).
- R3 Eq. 2: logits = +20 x cosine similarity, alpha fixed (PANet ``calDist``; notes A5); bilinear
  upsampling (align_corners=False) to the input before the loss and the output.
- R4 Eq. 4: CE on the scaled logits with 255 ignored; PAR = PANet ``alignLoss`` on the predicted query
  mask at feature resolution, eps 1e-5, ways with an empty predicted foreground skipped, weight 1, divided
  by shots x ways, mean over episodes (PANet; notes A6). The support target ignores 255 (notes A16; the
  PANet code counts 255 as background there).
- R5 momentum encoder: a copy of backbone + heads, parameters EMA-updated with m = 0.999 (Eq. 7); the update
  runs at the start of each training forward, before the keys are computed (MoCo's order; equal to
  updating after each optimizer step, Alg. 1, when every forward is one step: with ``train.accumulate`` A it
  runs A times per step, and it still runs on a step the trainer skips for a non-finite gradient). Its BN runs
  in train mode on the augmented views and its statistics are its own (MoCo; notes A18). No gradient (notes
  A11, A26).
- R6 augmentation T: MoCo v2 ``aug_plus`` (RandomResizedCrop scale (0.2, 1) to the input size, ColorJitter
  0.4/0.4/0.4/0.1 p 0.8, RandomGrayscale 0.2, Gaussian blur sigma U[0.1, 2] p 0.5, horizontal flip) with
  torchvision transforms.v2; crop and flip move the mask (nearest). The crop is redrawn up to 10 times
  until a foreground pixel survives, else the image is not cropped (notes 2.7, A19). Blur kernel 13 px
  (covers +-3 sigma; MoCo uses PIL's radius = sigma). Each support shot and the query get their own draw.
- R7 dictionary: M = 8,192 L2-normalised Gaussian keys, labels -1 (notes A10); after the losses, one key
  per (episode, way) = the normalised, shot-averaged momentum prototype p̄_c with its dataset class id,
  FIFO (notes A9, A20). Keys, labels and the write pointer are buffers: they are in the checkpoint.
- R8 L_cs-NCE: InfoNCE with the positive in the denominator (Alg. 3; notes A7); 7,000 negatives drawn
  uniformly without replacement from the keys whose label differs from c, missing ones masked to -inf
  (notes A8); mean over (episode, way).
- R9 L_ca-NCE: positive = MAP of the momentum features of the augmented query with its augmented mask;
  1,000 negatives each the mean of 5 distinct background pixels (label 0) of the nearest-downsampled
  augmented mask at feature size; an (episode, way) is skipped when that mask has < 5 foreground or < 5
  background pixels; /tau on every logit (notes A12-A15); mean over the kept pairs, 0 when none.
- R10 randomness: every random draw of a training forward (augmentation, negatives, pixels) comes from a
  ``torch.Generator`` seeded from the batch's episode ``index``; transforms.v2 draws from the global RNG,
  so each view runs under ``fork_rng`` seeded from that generator (ours). A resumed run repeats exactly.
- R11 K-shot: one model per K; p_c and p̄_c are shot means (notes 1.1, A20).
- R12 distributed: every rank enqueues the keys of all ranks in rank order, so the dictionary is one (MoCo's
  ``concat_all_gather``; the paper trains on one GPU). DDP also broadcasts rank 0's buffers at every step,
  which without the gather dropped the other ranks' keys.
- R13-R14 recipe (configs, docs/methods/dpcl.md): 30,000 iterations with the LR x0.1 at 10k and 20k
  (PANet's MultiStepLR, ``train.lr_steps``; notes A17), PANet's resize-and-flip pipeline as the engine's
  transform with ``augment.square`` (size x size, the aspect not kept) at scale 1: nothing padded or cropped.
"""
import copy
import warnings
from typing import Dict, List

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..backbones import create_backbone, require_backbone
from ..backbones.base import freeze
from .blocks import IGNORE, check_labels, cosine_logits
from .params import check_ranges
from .registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MultiLevelEncoder(nn.Module):
    """Backbone levels, each projected by a 1x1 conv to ``dim`` channels and concatenated (R1).

    (N, 3, H, W) -> (N, len(levels) * dim, h, w), h x w the finest level's grid. ``dim=0`` keeps the levels'
    own channels (no heads: PANet's plain VGG feature when levels = ["layer4"]).
    """

    def __init__(self, backbone: nn.Module, levels: List[str], dim: int, init: str = "default"):
        super().__init__()
        if init not in ("default", "orthogonal"):
            raise ValueError(f"head_init must be 'default' or 'orthogonal', got {init!r}")
        unknown = [lv for lv in levels if lv not in backbone.channels]
        if not levels or unknown:
            raise ValueError(f"levels must name backbone layers from {sorted(backbone.channels)}, got {levels}")
        self.backbone, self.levels = backbone, list(levels)
        self.heads = nn.ModuleDict({lv: nn.Conv2d(backbone.channels[lv], dim, 1) if dim else nn.Identity()
                                    for lv in levels})
        self.out_channels = sum(dim or backbone.channels[lv] for lv in levels)
        if init == "orthogonal" and dim:
            # Semi-orthogonal weights (W^T W = I when dim >= channels) and zero bias make each head an isometry:
            # cosine similarities, and so the untrained model's predictions, start as the backbone's own. (With
            # dim < channels the rows are orthonormal instead: a projection, no longer an isometry.)
            for head in self.heads.values():
                nn.init.orthogonal_(head.weight.flatten(1))
                nn.init.zeros_(head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone(x, layers=self.levels)
        size = max((feats[lv].shape[-2:] for lv in self.levels), key=lambda s: s[0] * s[1])
        outs = []
        for lv in self.levels:
            out = self.heads[lv](feats[lv])
            if out.shape[-2:] != size:
                out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
            outs.append(out)
        return torch.cat(outs, 1)


class MoCoV2Augment:
    """MoCo v2 ``aug_plus`` on ImageNet-normalised tensors with their label maps (R6).

    ``__call__(images (N, 3, H, W) float, masks (N, H, W) int64, generator)`` -> augmented copies of both,
    same shapes and dtypes, each image with its own draw; masks keep their values (nearest).
    """

    def __init__(self, crop_scale=(0.2, 1.0), retries: int = 10):
        self.crop_scale, self.retries = tuple(crop_scale), retries
        self.photometric = v2.Compose([
            v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(13, sigma=(0.1, 2.0))], p=0.5),
            v2.RandomHorizontalFlip(),
        ])

    def __call__(self, images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator):
        mean = images.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(3, 1, 1)
        crop = v2.RandomResizedCrop(tuple(images.shape[-2:]), scale=self.crop_scale, antialias=True)
        seeds = torch.randint(0, 2 ** 62, (images.shape[0],), generator=generator).tolist()
        out_images, out_masks = [], []
        for image, mask, seed in zip(images, masks, seeds):
            image = tv_tensors.Image((image * std + mean).clamp(0, 1))
            mask = tv_tensors.Mask(mask)
            with torch.random.fork_rng(devices=[]):  # transforms.v2 draws from the CPU's default generator
                torch.default_generator.manual_seed(seed)  # torch.manual_seed would reseed CUDA's too, unrestored
                for _ in range(self.retries):
                    cropped, cropped_mask = crop(image, mask)
                    if ((cropped_mask > 0) & (cropped_mask != IGNORE)).any():
                        image, mask = cropped, cropped_mask
                        break
                image, mask = self.photometric(image, mask)
            out_images.append((image.as_subclass(torch.Tensor) - mean) / std)
            out_masks.append(mask.as_subclass(torch.Tensor))
        return torch.stack(out_images), torch.stack(out_masks)


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """InfoNCE with the positive in the denominator (DPCL Alg. 3/4's CE over [positive, negatives]).

    anchor, positive (P, C); negatives (P, J) cosine similarities already computed (-inf = no negative).
    Returns the mean over P of ``-log softmax([cos(a, p), negatives] / tau)[0]``.
    """
    pos = F.cosine_similarity(anchor, positive, dim=-1)[:, None]
    logits = torch.cat([pos, negatives], 1) / tau
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def episode_seed(index: torch.Tensor) -> int:
    """A 63-bit seed from the batch's episode indices (R10): same episodes, same draws."""
    seed = 0x5DEECE66D
    for i in index.flatten().tolist():
        seed = (seed * 6364136223846793005 + int(i) + 1442695040888963407) % (2 ** 63)
    return seed


@register_model("dpcl")
class DPCL(nn.Module):
    """DPCL on PANet; ``params`` (all optional, paper values by default):

    contrastive (True: DPCL; False: PANet), levels (["layer2", "layer3", "layer4"]), head_dim (512; 0 = no
    heads), scale (20, alpha of Eq. 2), align (True, PANet's PAR), frozen_bn (False), momentum (0.999),
    dict_size (8192), cs_negatives (7000), ca_negatives (1000), ca_pixels (5), ca_min_pixels (5),
    tau (0.05), cs_weight (0.02, lambda1), ca_weight (0.015, lambda2), crop_scale ([0.2, 1.0]), output_stride
    (None: the backbone's default, 8 for ResNet-50 as PPNet, notes A2), head_init ("default": PyTorch's conv init,
    ours as DPCL has no public code; "orthogonal": isometric heads, zero bias, so training starts from the
    backbone's cosines).
    """

    DEFAULTS = {"contrastive": True, "levels": ["layer2", "layer3", "layer4"], "head_dim": 512, "scale": 20.0,
                "align": True, "frozen_bn": False, "momentum": 0.999, "dict_size": 8192, "cs_negatives": 7000,
                "ca_negatives": 1000, "ca_pixels": 5, "ca_min_pixels": 5, "tau": 0.05, "cs_weight": 0.02,
                "ca_weight": 0.015, "crop_scale": [0.2, 1.0], "output_stride": None, "head_init": "default",
                "void_background": True}

    def __init__(self, cfg, backend):
        super().__init__()
        params = dict(cfg.params or {})
        unknown = sorted(set(params) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(f"{cfg.name}: unknown model.params {unknown}; valid keys: {', '.join(self.DEFAULTS)}")
        self.p = {**self.DEFAULTS, **params}
        check_ranges(cfg.name, self.p, positive=("scale", "tau"), non_negative=("cs_weight", "ca_weight"),
                     unit=("momentum",))
        self.backend = backend
        # signed last features: PPNet's ResNet and PANet's VGG both drop the last ReLU
        options = {"dilation": "torchvision", "last_relu": False} if cfg.backbone.startswith("resnet") else \
            {"last_relu": False} if cfg.backbone == "vgg16_bn" else {}
        require_backbone(cfg.backbone, cfg.name)
        backbone = create_backbone(cfg.backbone, weights=cfg.weights, frozen_bn=self.p["frozen_bn"],
                                   output_stride=self.p["output_stride"], **options)
        if cfg.freeze_backbone:
            freeze(backbone)
        self.encoder = MultiLevelEncoder(backbone, self.p["levels"], self.p["head_dim"], self.p["head_init"])
        self.contrastive = bool(self.p["contrastive"])
        if self.contrastive:
            self.key_encoder = copy.deepcopy(self.encoder).requires_grad_(False)
            self.augment = MoCoV2Augment(self.p["crop_scale"])
            d, m = self.encoder.out_channels, self.p["dict_size"]
            self.register_buffer("queue_keys", F.normalize(torch.randn(m, d), dim=1))
            self.register_buffer("queue_labels", torch.full((m,), -1, dtype=torch.long))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict:
        """batch: the episode batch of ``docs/architecture.md``. Returns {"logits": (B, 1 + ways, H, W)} and,
        in training, "losses": {"query", "align", "cs_nce", "ca_nce"} (weighted as Eq. 8)."""
        ways, shots, support_fg = self.check_batch(batch)
        q_img, s_imgs, s_masks = batch["query_img"], batch["support_imgs"], batch["support_masks"]
        B, S = s_imgs.shape[:2]
        # The momentum pass runs first: its transient then sits on nothing, where after the main forward it sat on
        # every activation the trainable encoder keeps for backward (ResNet-50 473, batch 2: the step's peak 3880 ->
        # 3603 MB). It reads the parameters before this step's update either way, so no value changes (weights
        # and outputs after three training steps hashed the same before and after the move).
        keys = self.momentum_keys(batch, ways, shots) if self.training and self.contrastive else None
        feats = self.encoder(torch.cat([s_imgs.flatten(0, 1), q_img]))
        f_s, f_q = feats[:B * S], feats[B * S:]
        prototypes = self.support_prototypes(f_s, s_masks.flatten(0, 1), B, ways, shots)
        logits_small = cosine_logits(f_q, prototypes, self.p["scale"])
        logits = F.interpolate(logits_small, size=q_img.shape[-2:], mode="bilinear", align_corners=False)
        if not self.training:
            return {"logits": logits}
        losses = {"query": F.cross_entropy(logits, batch["query_mask"], ignore_index=IGNORE)}
        if self.p["align"]:
            losses["align"] = self.alignment_loss(f_s, f_q, logits_small, s_masks, ways, shots)
        if self.contrastive:
            losses.update(self.contrastive_losses(keys, prototypes[:, 1:], support_fg))
        return {"logits": logits, "losses": losses}

    def support_prototypes(self, f_s, masks, B, ways, shots):
        """Eq. 1 (R2): f_s (B*S, d, h, w), masks (B*S, H, W) -> (B, 1 + ways, d) = [bg, way 1..ways]."""
        # 255 counts as support background in PANet; void_background=False leaves it out of both (the baseline's)
        background = masks != 1 if self.p["void_background"] else masks == 0
        fg_bg = torch.stack([background, masks == 1], 1)
        pooled = self.backend.masked_average_pool(f_s, fg_bg, resize="features")  # (B*S, 2, d)
        pooled = pooled.view(B, ways, shots, 2, -1)
        return torch.cat([pooled[..., 0, :].mean((1, 2))[:, None], pooled[..., 1, :].mean(2)], 1)

    def alignment_loss(self, f_s, f_q, logits_small, s_masks, ways, shots):
        """PANet's prototype alignment (R4): query prototypes from the predicted mask segment each support."""
        B, S = s_masks.shape[:2]
        pred = logits_small.argmax(1)  # (B, h, w): constant w.r.t. the gradient
        q_protos, counts = self.backend.class_prototypes(f_q, pred, 1 + ways, resize="mask", eps=1e-5)
        way_of = torch.arange(ways, device=f_s.device).repeat_interleave(shots)  # (S,) way of each support
        protos = torch.stack([q_protos[:, :1].expand(B, S, -1), q_protos[:, 1:][:, way_of]], 2).flatten(0, 1)
        logits = cosine_logits(f_s, protos, self.p["scale"])
        logits = F.interpolate(logits, size=s_masks.shape[-2:], mode="bilinear", align_corners=False)
        target = s_masks.flatten(0, 1)
        pixel = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")
        per_support = pixel.sum((1, 2)) / (target != IGNORE).sum((1, 2)).clamp(min=1)
        keep = (counts[:, 1:][:, way_of] > 0).flatten()  # PANet skips ways with no predicted foreground
        return (per_support * keep).view(B, S).sum(1).div(S).mean()

    # ------------------------------------------------------------------------------------------- contrastive
    @torch.no_grad()
    def momentum_update(self):
        """Eq. 7 (R5): theta_m <- m theta_m + (1 - m) theta over the parameters of backbone and heads."""
        m = self.p["momentum"]
        for p_m, p in zip(self.key_encoder.parameters(), self.encoder.parameters()):
            p_m.mul_(m).add_(p.detach(), alpha=1 - m)

    @torch.no_grad()
    def momentum_keys(self, batch, ways, shots) -> Dict[str, torch.Tensor]:
        """The momentum side of R7-R9: update the key encoder, encode the MoCo-augmented episode and draw the
        negatives. Returns p_bar (B, ways, d), k_pos (B, ways, d), k_neg (B, ways, V, d) with ca_keep (B, ways),
        the dictionary negatives' indices and validity (B*ways, J), and the episode's class ids (B*ways,)."""
        B, S = batch["support_masks"].shape[:2]
        g = torch.Generator().manual_seed(episode_seed(batch["index"]))
        self.momentum_update()
        s_img, s_mask = self.augment(batch["support_imgs"].flatten(0, 1), batch["support_masks"].flatten(0, 1), g)
        q_img, q_mask = self.augment(batch["query_img"], batch["query_mask"], g)
        feats = self.key_encoder(torch.cat([s_img, q_img]))
        fb_s, fb_q = feats[:B * S], feats[B * S:]
        p_bar = self.backend.masked_average_pool(fb_s, (s_mask == 1)[:, None], resize="features")
        way_ids = torch.arange(1, ways + 1, device=q_mask.device).view(1, -1, 1, 1)
        k_pos = self.backend.masked_average_pool(fb_q, q_mask[:, None] == way_ids, resize="features")
        k_neg, ca_keep = self.background_keys(fb_q, q_mask, ways, g)
        classes = batch["classes"].flatten()
        queue_sim, queue_keep = self.dictionary_negatives(classes, g)
        return {"p_bar": p_bar.view(B, ways, shots, -1).mean(2), "k_pos": k_pos, "k_neg": k_neg,
                "ca_keep": ca_keep, "queue_sim": queue_sim, "queue_keep": queue_keep, "classes": classes}

    def contrastive_losses(self, keys, p_c, support_fg):
        """L_cs-NCE and L_ca-NCE (R7-R9) for the way prototypes p_c (B, ways, d) against ``momentum_keys``;
        enqueues the batch's keys. (episode, way) pairs whose supports lost every foreground pixel to the data
        augmentation (support_fg False) take no part: their p_c is the zero vector."""
        p_bar, k_pos, k_neg, ca_keep = keys["p_bar"], keys["k_pos"], keys["k_neg"], keys["ca_keep"]
        queue_sim, queue_keep, classes = keys["queue_sim"], keys["queue_keep"], keys["classes"]
        anchor = p_c.flatten(0, 1)  # (B*ways, d), the only term with a gradient (notes A26)
        valid = support_fg.flatten()
        sims = F.normalize(anchor, dim=1) @ self.queue_keys.to(anchor.dtype, copy=True).t()  # enqueue writes in place
        cs_neg = sims.gather(1, queue_sim).masked_fill(~queue_keep, float("-inf"))
        l_cs = info_nce(anchor[valid], p_bar.flatten(0, 1)[valid], cs_neg[valid], self.p["tau"]) if valid.any() \
            else anchor.new_zeros(())
        keep = ca_keep.flatten() & valid
        if keep.any():
            k_neg = k_neg.flatten(0, 1)[keep]
            ca_neg = torch.einsum("pc,pvc->pv", F.normalize(anchor[keep], dim=1), F.normalize(k_neg, dim=2))
            l_ca = info_nce(anchor[keep], k_pos.flatten(0, 1)[keep], ca_neg, self.p["tau"])
        else:
            l_ca = anchor.new_zeros(())
        self.enqueue(F.normalize(p_bar.flatten(0, 1)[valid].float(), dim=1), classes[valid])
        return {"cs_nce": self.p["cs_weight"] * l_cs, "ca_nce": self.p["ca_weight"] * l_ca}

    def dictionary_negatives(self, classes, g):
        """R8: for each (episode, way) ``cs_negatives`` dictionary slots of another class, uniformly without
        replacement -> indices (P, J) and a validity mask (False where fewer keys were eligible)."""
        eligible = self.queue_labels[None] != classes[:, None]  # (P, M)
        j = min(self.p["cs_negatives"], eligible.shape[1])
        score = torch.rand(eligible.shape, generator=g).to(eligible.device).masked_fill(~eligible, -1.0)
        index = score.topk(j, dim=1).indices
        return index, eligible.gather(1, index)

    def background_keys(self, fb_q, q_mask, ways, g):
        """R9: ``ca_negatives`` keys per (episode, way), each the mean of ``ca_pixels`` distinct background
        pixels of fb_q (B, d, h, w) -> (B, ways, V, d), and which pairs are kept (B, ways)."""
        B, d, h, w = fb_q.shape
        v, n, low = self.p["ca_negatives"], self.p["ca_pixels"], self.p["ca_min_pixels"]
        small = F.interpolate(q_mask[:, None].float(), size=(h, w), mode="nearest")[:, 0].long().flatten(1)
        keys = fb_q.new_zeros(B, ways, v, d)
        keep = torch.zeros(B, ways, dtype=torch.bool, device=fb_q.device)
        for b in range(B):
            background = (small[b] == 0).nonzero()[:, 0]
            if background.numel() < max(n, low):
                continue
            pick = torch.rand(v, background.numel(), generator=g).topk(n, dim=1).indices.to(fb_q.device)
            rows = fb_q[b].flatten(1).t().contiguous()  # (h*w, d): gathering whole rows is a plain copy
            pixels = rows.index_select(0, background[pick.flatten()]).view(v, n, d).mean(1)  # (V, d)
            for way in range(ways):
                if int((small[b] == way + 1).sum()) >= low:
                    keys[b, way], keep[b, way] = pixels, True
        return keys, keep

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor):
        """FIFO write of (P, d) keys with their class ids at the pointer, wrapping around (R7). Under
        torch.distributed every rank writes every rank's keys, in rank order (R12)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts = [None] * dist.get_world_size()  # counts differ between ranks (support_fg): objects, not tensors
            dist.all_gather_object(parts, (keys.detach().cpu(), labels.cpu()))
            keys = torch.cat([k for k, _ in parts]).to(self.queue_keys.device)
            labels = torch.cat([c for _, c in parts]).to(self.queue_labels.device)
        m = self.queue_keys.shape[0]
        slots = (int(self.queue_ptr) + torch.arange(len(keys), device=keys.device)) % m
        self.queue_keys[slots] = keys.to(self.queue_keys.dtype)
        self.queue_labels[slots] = labels
        self.queue_ptr.fill_((int(self.queue_ptr) + len(keys)) % m)

    # ---------------------------------------------------------------------------------------------- checks
    def check_batch(self, batch) -> tuple:
        """Shapes and values of the episode batch; returns (ways, shots, support_fg (B, ways) bool: the way's
        supports hold a foreground pixel). Raises ValueError naming the key. A way may lose its support
        foreground to the resize (the test resize of a one-pixel object, the training crop): its prototype is
        then the zero vector and its logit 0 everywhere, as PANet's ``getFeatures`` and ``calDist`` give, with a
        warning at inference so that a long evaluation is not stopped by one episode; in training the episode
        trains the segmentation losses only."""
        q_img, s_imgs, s_masks = batch["query_img"], batch["support_imgs"], batch["support_masks"]
        if s_imgs.dim() != 5 or q_img.dim() != 4 or s_imgs.shape[0] != q_img.shape[0]:
            raise ValueError(f"support_imgs must be (B, S, 3, H, W) and query_img (B, 3, H, W) with one B; got "
                             f"{tuple(s_imgs.shape)} and {tuple(q_img.shape)}")
        B, S = s_imgs.shape[:2]
        if tuple(s_masks.shape) != (B, S) + tuple(s_imgs.shape[-2:]):
            raise ValueError(f"support_masks {tuple(s_masks.shape)} does not match support_imgs {tuple(s_imgs.shape)}:"
                             f" expected (B, S, H, W) = {(B, S) + tuple(s_imgs.shape[-2:])}")
        ways = batch["classes"].shape[1] if "classes" in batch else 1
        if S == 0 or S % ways:
            raise ValueError(f"{S} support images do not split into {ways} way(s) x K shots (support_imgs is "
                             f"way-major, S = ways x shots)")
        shots = S // ways
        check_labels("dpcl", "support_masks", s_masks)
        fg = (s_masks == 1).flatten(2).sum(2).view(B, ways, shots).sum(2)
        if (fg == 0).any() and not self.training:
            b, way = (fg == 0).nonzero()[0].tolist()
            index = batch["index"][b].item() if "index" in batch else b
            warnings.warn(f"episode {index}: way {way + 1} has no foreground pixel in any of its {shots} support "
                          f"mask(s) at the input size; its prototype is the zero vector (PANet's), so the way is "
                          f"never predicted")
        if "query_mask" in batch:
            q_mask = batch["query_mask"]
            if tuple(q_mask.shape) != (B,) + tuple(q_img.shape[-2:]):
                raise ValueError(f"query_mask {tuple(q_mask.shape)} does not match query_img {tuple(q_img.shape)}")
            check_labels("dpcl", "query_mask", q_mask, top=ways)
        elif self.training:
            raise ValueError("training needs batch['query_mask']")
        if self.training and self.contrastive and ("index" not in batch or "classes" not in batch):
            raise ValueError("DPCL training needs batch['index'] (seeds its randomness) and batch['classes'] "
                             "(dictionary labels)")
        return ways, shots, fg > 0


@register_model("panet")
class PANet(DPCL):
    """PANet with DPCL's encoder: the same code as :class:`DPCL` with ``contrastive=False`` by default."""

    DEFAULTS = {**DPCL.DEFAULTS, "contrastive": False}
