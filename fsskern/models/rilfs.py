"""RILFS (Cao et al., "Reflection Invariance Learning for Few-shot Semantic Segmentation") on BAM (Lang et
al., "Learning What Not to Segment", CVPR 2022). ``reflection=False`` is BAM: the same code with the
reflected views, the fusion scalars and the two fusion convs left out (registered as ``bam``).

Module layout and conventions follow the public BAM code (chunbolang/BAM ``model/BAM.py``, ``PSPNet.py``,
``ASPP.py``, ``PPM.py``); the spec with every equation is ``../shared/notes/methods/rilfs.md`` and
``docs/methods/rilfs.md`` lists the resolutions below with their sources.

Two phases (``params.phase``), one class:

- ``base`` (BAM ``train_base.py``): PSPNet (backbone + PPM + classifier) trained on the fold's base classes,
  supervised by the batch's ``base_label`` (0 = background, 1..base_classes, 255 ignore).
- ``meta`` (BAM ``train.py``): backbone and base learner frozen (loaded from ``params.base_weights``), the
  meta learner and the ensemble trained on 1-way episodes. The chained recipes load the base phase's last
  weights, where BAM loads its best-validated ``best.pth`` (early stopping after 75 epochs without a gain):
  the engine's validation is episodic, the base learner is not [ours].

Meta-phase forward for an episode, V = 2 query views (original, reflected) and U = 2 support views
(V = U = 1 for BAM). Every module runs once per view on the batch ``reflection=False`` runs (convolutions may
pick another algorithm for another batch size, so with the identity settings RILFS reproduces this file's BAM
bit for bit; upstream BAM encodes one shot at a time, here the B * K supports are one batch); the backend ops
take both support views in one call:

1. images and support masks flipped along the width (M0); the frozen backbone runs on the V * B queries and
   the B * U * K supports (support layer4 on layer3 * mask, BAM).
2. meta features: 1x1 conv of concat(layer3, layer2) to 256-d (query and support convs separate).
3. BAM adjustment factor per (query view, support view, shot): ||G(q) - G(s)||_F / C with G the
   normalised Gram matrix of layer2 (B1-B2), BAM K-shot weights (B3) per (query view, support view),
   fused factor theta_f = a1 theta_o + a2 theta_h (Eq. 11), a1 = a2 = 0.5 at init, shared by both
   query views [ours].
4. prototypes: ``backend.masked_average_pool`` once on both support views (Eq. 1 inputs), K shots fused
   with the original query view's BAM weights, then P_FI = p1 P_o + p2 P_f (Eq. 1, p = 0.5 at init
   [ours]; paper 4.2: "multiple prototypes are first combined ... then" Eq. 1).
5. RIPMG: ``backend.prior_mask(reduce=None)`` per query view on both support views stacked along the
   shot axis; shots weighted as BAM; m_FI = F(concat(m_f, m_o)) with F a bias-free 1x1 conv 2 -> 1 at
   (0.5, 0.5), shared by both query views (Eq. 8; BAM prior: eps, background as zero vectors, min-max).
6. meta learner on concat(F_q, P_FI, m_FI) (Eq. 9-10: BAM init_merge, ASPP, res1, res2, cls_meta); ASPP rates
   ``params.aspp_dilations``, BAM's 6 / 12 / 18 for its 60 x 60 grid; the CPU recipes take 3 / 6 / 9 for their
   31 x 31 test grid, the rates scaled with the grid as DeepLab does [ours].
7. frozen base learner on layer4 (BN in eval mode, its Dropout2d on in training: BAM's ``fix_bn``
   touches BatchNorm only); BAM ensemble: softmax, gram_merge with theta_f, cls_merge with the
   base foreground map, the episode's own base class excluded wherever the batch names it (``base_label``:
   training, and validation on held-out base-class episodes, which must score what BAM's selection on novel
   classes scores: a class the base learner does not suppress; resolution 20).
8. RISP: the reflected prediction flipped back to the original frame [ours: the paper does not say],
   then F_fuse (bias-free 1x1 conv 2 -> 1 at (0.5, 0.5), one conv for fg and bg) (Eq. 12-13).
9. losses at the input size (Eq. 14-15): CE(R_ff, M) + alpha CE(R_o, M) + beta CE(R_f, flip(M)) + meta
   loss CE(meta_o, M) + CE(meta_h, flip(M)); alpha = beta = 0.5 (paper), 2-class cross-entropy with
   ignore 255 for the paper's "BCE" (BAM); BAM's base-learner CE has no gradient and is left out.

Batch (``docs/architecture.md``): query_img (B, 3, H, W), support_imgs (B, K, 3, H, W), support_masks
(B, K, H, W) int64 (1 = fg; 0 and 255 are background for the features, as BAM), query_mask (B, H, W)
training only, base_label (B, H, W) (phase ``base``; in phase ``meta`` it names the episode's base class,
which the ensemble must not suppress; training and validation batches carry it, test batches do not). Output:
{"logits": (B, 2, H, W) (bg, fg) scores (R_ff, or BAM's final_out), "losses": {...} in training}. Phase ``base``
returns the base learner's (B, base_classes + 1, H, W) logits instead.
"""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import (Backbone, create_backbone, fix_bn, freeze, list_backbones, read_model_state,
                         require_backbone)
from .blocks import ASPP, PPM, check_one_way_batch
from .params import check_ranges, parse_params
from .registry import register_model

# name: (default, type, meaning). The model refuses any other key.
PARAMS = {
    "phase": ("meta", str, "'base': train the PSPNet base learner; 'meta': train the meta learner"),
    "reflection": (True, bool, "RILFS (True) or BAM (False)"),
    "shots": (1, int, "K the model is built for (BAM's K-shot weighting has K inputs)"),
    "base_classes": (15, int, "base classes of the fold without background (PASCAL-5i 15, COCO-20i 60)"),
    "base_weights": (None, str, "phase-1 checkpoint: backbone + base learner for the meta phase"),
    "reduce_dim": (256, int, "meta feature width (BAM)"),
    "kshot_trans_dim": (2, int, "hidden width of BAM's K-shot reweighting"),
    "ppm_bins": ([1, 2, 3, 6], list, "PSPNet pyramid bins"),
    "aspp_dilations": ([6, 12, 18], list, "the meta learner's ASPP rates (BAM's, for its 60 x 60 grid at 473)"),
    "base_hidden": (512, int, "PSPNet classifier width"),
    "alpha": (0.5, float, "Eq. 14 weight of CE(R_o)"),
    "beta": (0.5, float, "Eq. 14 weight of CE(R_f)"),
    "meta_weight": (1.0, float, "weight of the meta loss per view (BAM aux_weight1)"),
    "encoder_lr_mult": (1.0, float, "base phase: backbone LR / head LR (BAM PASCAL 0.1, COCO 1.0)"),
    "train_bn": (True, bool, "base phase: update the backbone's BatchNorm (BAM); False keeps it frozen"),
    "prior_search": ("fp32", str, "the fused prior's search: 'fp32' (the exact kernel) or 'bf16' (the certified bf16 "
                     "search: the same argmax, values within fp32 rounding, faster where there is bf16 hardware)"),
}


def _parse_params(name: str, given: Dict, reflection_default: bool) -> Dict:
    defaults = {k: (reflection_default if k == "reflection" else d) for k, (d, _, _) in PARAMS.items()}
    out = parse_params(name, given, defaults)
    for key, value in given.items():
        kind = PARAMS[key][1]
        if value is None and key == "base_weights":
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            out[key] = value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"{name}: model.params.{key} must be {kind.__name__}, got {value!r}")
    if out["phase"] not in ("base", "meta"):
        raise ValueError(f"{name}: model.params.phase must be 'base' or 'meta', got {out['phase']!r}")
    unread = [k for k in ("alpha", "beta") if not out["reflection"] and out[k] != PARAMS[k][0]]
    if unread:  # BAM's recipes inherit RILFS's (the defaults); a value set for BAM would change nothing
        raise ValueError(f"{name}: model.params.{' and '.join(unread)} weight the reflected views' losses (Eq. 14), "
                         f"which BAM (reflection false) has none of")
    check_ranges(name, out, non_negative=("alpha", "beta", "meta_weight", "encoder_lr_mult"))
    if out["prior_search"] not in ("fp32", "bf16"):
        raise ValueError(f"{name}: model.params.prior_search must be 'fp32' or 'bf16', got {out['prior_search']!r}")
    rates = out["aspp_dilations"]
    if len(rates) != 3 or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rates):
        raise ValueError(f"{name}: model.params.aspp_dilations must be three ints >= 1 (res1 reads 5 branches), "
                         f"got {rates!r}")
    for key in ("shots", "base_classes", "reduce_dim", "kshot_trans_dim", "base_hidden"):
        if out[key] < 1:
            raise ValueError(f"{name}: model.params.{key} must be >= 1, got {out[key]}")
    if out["base_classes"] >= 255:  # base_label numbers them 1..n: the 255th would be the ignore label
        raise ValueError(f"{name}: model.params.base_classes must be <= 254 (base_label's 255 is ignore), got "
                         f"{out['base_classes']} (FSS-1000's 520 training classes do not fit a base learner)")
    return out


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """BAM ``get_gram_matrix``: (N, C, h, w) -> (N, C, C), G_ij = <a_i, a_j> / (|a_i| |a_j| + 1e-7), float32.
    Autocast is off inside: it would run the bmm in half, where a channel's |a_i|^2 above 65504 (an RMS of 4.3
    over 60 x 60) is inf in fp16, and the Gram entries (K-shot ranking, the gram_merge weight) lose bits in bf16."""
    with torch.autocast(features.device.type, enabled=False):
        a = features.float().flatten(2)
        norm = a.norm(dim=2, keepdim=True)
        return torch.bmm(a, a.transpose(1, 2)) / (torch.bmm(norm, norm.transpose(1, 2)) + 1e-7)


def _fusion_conv(init) -> nn.Conv2d:
    """Bias-free 1x1 conv 2 -> 1 with the given initial weights (BAM's gram_merge/cls_merge form)."""
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(init, dtype=torch.float32).view(1, 2, 1, 1))
    return conv


class BaseLearner(nn.Module):
    """PSPNet head (BAM ``PSPNet.py``): PPM -> 3x3 conv -> BN -> ReLU -> Dropout2d(0.1) -> 1x1 conv to classes."""

    def __init__(self, in_channels: int, num_classes: int, bins, hidden: int):
        super().__init__()
        self.ppm = PPM(in_channels, in_channels // len(bins), tuple(bins))
        self.cls = nn.Sequential(
            nn.Conv2d(in_channels + len(bins) * (in_channels // len(bins)), hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU(inplace=True), nn.Dropout2d(0.1), nn.Conv2d(hidden, num_classes, 1))

    def forward(self, x):
        return self.cls(self.ppm(x))


def _conv_relu(cin, cout, k=1, dropout=0.0):
    layers = [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Dropout2d(dropout)) if dropout else nn.Sequential(*layers)


@register_model("rilfs")
class RILFS(nn.Module):
    """RILFS / BAM few-shot segmenter; see the module docstring for the forward order and the batch."""

    reflection_default = True

    def __init__(self, cfg, backend):
        super().__init__()
        p = _parse_params(cfg.name, dict(cfg.params or {}), self.reflection_default)
        self.backend, self.p = backend, p
        self.phase, self.reflection, self.shots = p["phase"], p["reflection"], p["shots"]
        self.views = 2 if self.reflection else 1
        self.search_dtype = torch.bfloat16 if p["prior_search"] == "bf16" else None
        if self.phase == "meta" and not cfg.freeze_backbone:
            raise ValueError("rilfs/bam: the meta phase keeps the backbone frozen (paper 4.2, BAM); "
                             "set model.freeze_backbone: true")
        frozen_bn = cfg.freeze_backbone or self.phase == "meta" or not p["train_bn"]
        require_backbone(cfg.backbone, "rilfs/bam")
        self.backbone = create_backbone(cfg.backbone, weights=cfg.weights, frozen_bn=frozen_bn)
        if type(self.backbone).stages is Backbone.stages:  # Xception-65's layer2 reads two earlier maps
            staged = [n for n in list_backbones() if not n.startswith("deeplabv3plus_") and n != cfg.backbone]
            raise ValueError(f"rilfs/bam: backbone {cfg.backbone!r} runs as one pass, and BAM computes the support's "
                             f"layer4 from layer3 x mask stage by stage; choose one of {', '.join(staged)}")
        ch = self.backbone.channels
        self.base_learner = BaseLearner(ch["layer4"], p["base_classes"] + 1, p["ppm_bins"], p["base_hidden"])
        d = p["reduce_dim"]
        self.down_query = _conv_relu(ch["layer3"] + ch["layer2"], d, dropout=0.5)
        self.down_supp = _conv_relu(ch["layer3"] + ch["layer2"], d, dropout=0.5)
        self.init_merge = _conv_relu(2 * d + 1, d)
        self.aspp = ASPP(d, d, p["aspp_dilations"])
        self.res1 = _conv_relu(5 * d, d)
        self.res2 = nn.Sequential(_conv_relu(d, d, 3), _conv_relu(d, d, 3))
        self.cls_meta = nn.Sequential(_conv_relu(d, d, 3, dropout=0.1), nn.Conv2d(d, 2, 1))
        self.gram_merge = _fusion_conv([1.0, 0.0])
        self.cls_merge = _fusion_conv([1.0, 0.0])
        if self.shots > 1:
            t = p["kshot_trans_dim"]
            self.kshot_rw = nn.Sequential(nn.Conv2d(self.shots, t, 1), nn.ReLU(inplace=True),
                                          nn.Conv2d(t, self.shots, 1))
        if self.reflection:
            self.proto_weights = nn.Parameter(torch.tensor([0.5, 0.5]))   # (p1, p2) of Eq. 1
            self.factor_weights = nn.Parameter(torch.tensor([0.5, 0.5]))  # (a1, a2) of Eq. 11
            self.prior_fuse = _fusion_conv([0.5, 0.5])                    # F of Eq. 8, input (m_f, m_o)
            self.pred_fuse = _fusion_conv([0.5, 0.5])                     # F_fuse of Eq. 12-13, input (R_o, R_f)
        # Both phases hold every module, so the trainer's phase chaining (a strict load of the previous
        # phase's weights) works; each phase trains only its own part.
        if self.phase == "base":
            for name, module in self.named_children():
                if name not in ("backbone", "base_learner"):
                    module.requires_grad_(False)
            for param in self.parameters(recurse=False):  # the Eq. 1 and Eq. 11 scalars
                param.requires_grad_(False)
            if cfg.freeze_backbone:
                freeze(self.backbone)
        else:
            freeze(self.backbone)
            if p["base_weights"]:
                self.load_base_learner(p["base_weights"])
            freeze(self.base_learner)

    # ----------------------------------------------------------------------------------------- setup
    def load_base_learner(self, path):
        """Backbone and base learner from a phase-1 checkpoint (an fsskern checkpoint or a bare state dict
        of this class in phase ``base``); every key of both must be there."""
        state = read_model_state(path, "rilfs/bam: model.params.base_weights", " (the base phase's last.pt)")
        for prefix, module in (("backbone.", self.backbone), ("base_learner.", self.base_learner)):
            part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                missing, unexpected = module.load_state_dict(part, strict=False)
                problem = f"missing {missing[:5]}, unexpected {unexpected[:5]}" if missing or unexpected else None
            except RuntimeError as e:  # shape mismatches
                problem = str(e).splitlines()[-1].strip()
            if problem:
                raise ValueError(f"rilfs/bam: {path} does not fit {prefix[:-1]} ({problem}); is it a phase-1 "
                                 f"checkpoint of this backbone and base_classes={self.p['base_classes']}?")

    def train(self, mode: bool = True):
        super().train(mode)
        if self.phase == "meta":  # BAM's train.py: model.train(), then fix_bn, so the frozen head's dropout stays on
            fix_bn(self.base_learner)
        return self

    def param_groups(self, train_cfg=None):
        """Base phase: the backbone at ``encoder_lr_mult`` x train.lr (BAM's index_split), the head at
        train.lr; meta phase: every trainable parameter at train.lr (BAM). ``lr_mult`` as the engine reads it."""
        trainable = lambda module: [q for q in module.parameters() if q.requires_grad]  # noqa: E731
        if self.phase == "base":
            return [{"params": trainable(self.backbone), "lr_mult": self.p["encoder_lr_mult"]},
                    {"params": trainable(self.base_learner)}]
        return [{"params": trainable(self)}]

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, batch: Dict) -> Dict:
        if self.phase == "base":
            return self._forward_base(batch)
        query, supports, masks = self._check_batch(batch)
        B, size = query.shape[0], query.shape[-2:]
        # M0. Views are lists (original, reflected): every module sees BAM's batch, so with the identity
        # settings RILFS reproduces BAM bit for bit; the backend ops take both views in one call.
        queries, supports, masks = [query], [supports], [masks]
        if self.reflection:
            queries.append(query.flip(-1))
            supports.append(supports[0].flip(-1))
            masks.append(masks[0].flip(-1))
        # Peak memory: the base learner reads only layer4, so it runs right after each query view's backbone pass,
        # its PPM transient (~310 MB at 473) over one view's maps rather than all four; layer2 lives on as its Gram
        # matrix only, and layer4 goes once the priors have it (ResNet-50 473 1-shot: step 1092 -> 603 MB, inference
        # 650 -> 467).
        q, base_out = [], []
        for x in queries:
            q.append(self._features(x))
            with torch.no_grad():
                base_out.append(self.base_learner(q[-1]["layer4"]))
        s = [self._features(x, m) for x, m in zip(supports, masks)]
        est, weights = self.scene_distances([f["gram"] for f in q], [f["gram"] for f in s])
        theta = (weights * est).sum(-1)                                   # (B, V, U)
        theta = (self.factor_weights * theta).sum(-1) if self.reflection else theta[..., 0]  # Eq. 11
        proto = self.prototypes([f["meta"] for f in s], masks, weights)   # Eq. 1: (B, C)
        priors = self.priors([f.pop("layer4") for f in q], [f.pop("layer4") for f in s], masks, weights,
                             q[0]["meta"].shape[-2:])                     # Eq. 2-8: V x (B, 1, h, w)
        target = self._base_target(batch)  # None on test episodes (novel classes: no base_label)
        meta_out, pred = [], []
        for v in range(self.views):                                       # Eq. 9-10, BAM ensemble
            feat = q[v]["meta"]
            x = self.init_merge(torch.cat([feat, proto[..., None, None].expand_as(feat), priors[v]], 1))
            x = self.res1(self.aspp(x))
            meta_out.append(self.cls_meta(self.res2(x) + x))
            base = base_out[v]
            if base.shape[-2:] != feat.shape[-2:]:
                base = F.interpolate(base, feat.shape[-2:], mode="bilinear", align_corners=True)
            pred.append(self.ensemble(meta_out[v], base, theta[:, v], target))
        final = self.risp(*pred) if self.reflection else pred[0]          # Eq. 12-13
        up = lambda t: F.interpolate(t, size, mode="bilinear", align_corners=True)  # noqa: E731
        out = {"logits": up(final)}
        if self.training:                                                 # Eq. 14-15
            y = batch["query_mask"]
            ce = lambda logits, target: F.cross_entropy(logits.float(), target, ignore_index=255)  # noqa: E731
            w = self.p["meta_weight"]
            out["losses"] = {"final": ce(out["logits"], y), "meta": w * ce(up(meta_out[0]), y)}
            if self.reflection:
                yh = y.flip(-1)
                out["losses"].update(original=self.p["alpha"] * ce(up(pred[0]), y),
                                     reflected=self.p["beta"] * ce(up(pred[1]), yh),
                                     meta_reflected=w * ce(up(meta_out[1]), yh))
        return out

    def _forward_base(self, batch):
        x = batch["query_img"]
        if x.dim() != 4:
            raise ValueError(f"rilfs/bam: query_img must be (B, 3, H, W), got {tuple(x.shape)}")
        features = self.backbone(x, layers=("layer4",))["layer4"]
        logits = F.interpolate(self.base_learner(features), x.shape[-2:], mode="bilinear", align_corners=True)
        out = {"logits": logits}
        if self.training:
            if "base_label" not in batch:
                raise KeyError("rilfs/bam: the base phase trains on the batch's base_label (BAM base annotation); "
                               "the batch has none")
            label = batch["base_label"]
            if label.shape != (x.shape[0],) + x.shape[-2:]:
                raise ValueError(f"rilfs/bam: base_label must be (B, H, W) = {(x.shape[0],) + tuple(x.shape[-2:])}, "
                                 f"got {tuple(label.shape)}")
            top = int(label.masked_fill(label == 255, 0).max())
            if top > self.p["base_classes"]:
                raise ValueError(f"rilfs/bam: base_label holds class {top} but model.params.base_classes is "
                                 f"{self.p['base_classes']} (the fold's base classes without background)")
            out["losses"] = {"base": F.cross_entropy(logits.float(), label, ignore_index=255)}
        return out

    def _check_batch(self, batch):
        query, supports, smasks = check_one_way_batch("rilfs/bam", batch, self.training)
        if supports.shape[1] != self.shots:
            raise ValueError(f"rilfs/bam: the model is built for {self.shots} shot(s) (model.params.shots; BAM's "
                             f"K-shot weighting has K inputs), the batch has {supports.shape[1]} supports")
        return query, supports, (smasks == 1).to(query.dtype)

    def _features(self, images, masks=None):
        """Frozen backbone (no grad) and the trainable 256-d meta features of one view.

        Query: images (B, 3, H, W). Support: images (B, K, 3, H, W) with masks (B, K, H, W) float; its
        tensors come out as (B * K, ...) and its layer4 is layer4(layer3 * mask) (BAM). layer2 is resized
        to layer3's grid when they differ (BAM's VGG rule).
        """
        if masks is not None:
            images, masks = images.flatten(0, 1), masks.flatten(0, 1)[:, None]
        out = {}
        with torch.no_grad():
            x = images
            for name, stage in self.backbone.stages():
                if name == "layer4" and masks is not None:
                    x = x * F.interpolate(masks, x.shape[-2:], mode="bilinear", align_corners=True)
                x = stage(x)
                if name in ("layer2", "layer3", "layer4"):  # layer0 / layer1 would only add to layer4's peak
                    out[name] = x
            if out["layer2"].shape[-2:] != out["layer3"].shape[-2:]:
                out["layer2"] = F.interpolate(out["layer2"], out["layer3"].shape[-2:], mode="bilinear",
                                              align_corners=True)
            out["gram"] = gram_matrix(out["layer2"])
        reduce = self.down_query if masks is None else self.down_supp
        out["meta"] = reduce(torch.cat([out["layer3"], out["layer2"]], 1))
        # Only what the later steps read stays alive (layer4: the prior and the base learner; layer2 as its Gram
        # matrix): layer0-layer3 of a 1-shot episode's 8 images hold ~350 MB at 473 (ResNet-50, batch 2).
        return {k: out[k] for k in ("gram", "layer4", "meta")}

    def scene_distances(self, q_gram, s_gram):
        """BAM's adjustment-factor terms and K-shot weights for every (query view, support view, shot).

        q_gram: V query Gram matrices of layer2 (B, C, C); s_gram: U support ones (B * K, C, C) (``gram_matrix``).
        Returns est (B, V, U, K) = ||G(q) - G(s)||_F / C (B2, float32) and weights (B, V, U, K): BAM's K-shot
        reweighting (B3) per (query view, support view) pair, all ones for K = 1.
        """
        B, C = q_gram[0].shape[:2]
        gq = torch.stack(q_gram, 1)[:, :, None, None]                                   # (B, V, 1, 1, C, C)
        gs = torch.stack([g.view(B, self.shots, C, C) for g in s_gram], 1)[:, None]     # (B, 1, U, K, C, C)
        est = (gq - gs).flatten(-2).norm(dim=-1) / C
        if self.shots == 1:
            return est, torch.ones_like(est)
        flat = est.reshape(-1, self.shots, 1, 1)
        ranked, order = flat.sort(1)
        weights = self.kshot_rw(ranked.to(self.kshot_rw[0].weight.dtype)).float().gather(1, order.argsort(1))
        return est, weights.softmax(1).view_as(est)

    def prototypes(self, fs, masks, weights):
        """Eq. 1 after BAM's K-shot fusion: fs U maps (B * K, C, h, w), masks U x (B, K, H, W) -> (B, C).

        One ``masked_average_pool`` call (BAM Weighted_GAP: mask resized bilinear to the features,
        eps 5e-4) on both support views; shots weighted with the original query view's weights.
        """
        B = masks[0].shape[0]
        protos = self.backend.masked_average_pool(torch.cat(fs), torch.cat(masks).flatten(0, 1)[:, None],
                                                  resize="mask")
        protos = protos.view(self.views, B, self.shots, -1)
        fused = (weights[:, 0].transpose(0, 1)[..., None].to(protos.dtype) * protos).sum(2)  # (U, B, C)
        if not self.reflection:
            return fused[0]
        return (self.proto_weights.view(2, 1, 1).to(fused.dtype) * fused).sum(0)

    def priors(self, q4, s4, masks, weights, out_size):
        """RIPMG (Eq. 2-8) / BAM's prior: q4 V maps (B, C, h, w), s4 U maps (B * K, C, h, w), masks U x
        (B, K, H, W) -> V priors (B, 1, out_size).

        Per query view one ``prior_mask(reduce=None)`` call on the U * K supports stacked along the shot
        axis; shots weighted with that view's K-shot weights; the two support views fused by F (Eq. 8,
        input order (reflected, original)). bf16 / fp16 features (autocast) go to the op as they are: it computes
        in float32 and returns float32 priors, so the min-max and eps are BAM's fp32 ones. ``prior_search: bf16``
        takes the certified bf16 search for float32 features on bf16 hardware (``fsskern.ops.certified_search``;
        the fp32 kernel elsewhere and in the reference backend).
        """
        B, K, U = masks[0].shape[0], self.shots, self.views
        support = torch.cat([x.view(B, K, *x.shape[1:]) for x in s4], 1)  # (B, U * K, C, h, w)
        support_masks = torch.cat(masks, 1).detach()
        out = []
        for v, query in enumerate(q4):
            pri = self.backend.prior_mask(query, support, support_masks, reduce=None, out_size=tuple(out_size),
                                          search_dtype=self.search_dtype)
            pri = (weights[:, v, :, :, None, None] * pri.view(B, U, K, *pri.shape[-2:])).sum(2)  # (B, U, h, w)
            out.append(self.prior_fuse(pri.flip(1)) if self.reflection else pri)
        return out

    def ensemble(self, meta_out, base_out, theta, target=None):
        """BAM's learner ensemble: meta_out (B, 2, h, w), base_out (B, 1 + base_classes, h, w), theta (B,)
        adjustment factors, target (B,) base-class index of the episode (0 = unknown) or None -> (B, 2, h, w).

        bg = cls_merge(gram_merge(p_meta_bg, theta), sum of base foreground probabilities), fg =
        gram_merge(p_meta_fg, theta); the episode's own base class (target) is not summed (BAM, in training).
        """
        meta = meta_out.softmax(1)
        base = base_out.float().softmax(1).to(meta.dtype)
        keep = torch.ones_like(base[:, :, :1, :1])
        keep[:, 0] = 0
        if target is not None:
            keep[torch.arange(len(target), device=target.device), target] = 0
        base_map = (base * keep).sum(1, keepdim=True)
        th = theta.view(-1, 1, 1, 1).to(meta.dtype).expand_as(meta[:, :1])
        bg = self.gram_merge(torch.cat([meta[:, :1], th], 1))
        fg = self.gram_merge(torch.cat([meta[:, 1:], th], 1))
        return torch.cat([self.cls_merge(torch.cat([bg, base_map], 1)), fg], 1)

    def risp(self, pred_o, pred_h):
        """RISP (Eq. 12-13): the reflected prediction flipped back, then bg and fg each fused by F_fuse."""
        pred_h = pred_h.flip(-1)
        return torch.cat([self.pred_fuse(torch.cat([pred_o[:, c:c + 1], pred_h[:, c:c + 1]], 1)) for c in (0, 1)], 1)

    def _base_target(self, batch):
        """The episode class in the base-label space, read from base_label under the query foreground
        (the most frequent base label there); 0 (nothing excluded but background) when unknown."""
        if "base_label" not in batch:
            return None
        label, fg = batch["base_label"], batch["query_mask"] == 1
        n = self.p["base_classes"] + 1
        valid = fg & (label > 0) & (label < n)
        counts = torch.zeros(label.shape[0], n, device=label.device)
        counts.scatter_add_(1, torch.where(valid, label, 0).flatten(1), valid.flatten(1).float())
        return counts.argmax(1) * (counts.sum(1) > 0)


@register_model("bam")
class BAM(RILFS):
    """BAM (Lang et al., CVPR 2022): RILFS with ``reflection=False`` by default."""

    reflection_default = False
