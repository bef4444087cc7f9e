"""CRCNet (Liu, Zhang, Lin, Liu, "CRCNet: Few-shot Segmentation with Cross-Reference and Region-Global
Conditional Networks", the journal extension of CRNet, CVPR 2020). No public code exists: the spec with
every equation and gap resolution is ``../shared/notes/methods/crcnet.md`` (section numbers below are its
own); conventions the paper leaves open follow CANet (icoz69/CaNet, same group). ``docs/methods/crcnet.md``
lists every resolution with its source (paper / notes / ours).

Forward for B pairs (support s with mask, query q), both branches batched along the batch axis (2B):

1. Siamese encoder (2.1): the backbone (ResNet-50 dilated with torchvision's ``replace_stride_with_dilation``
   rule, output stride 8; frozen by default [notes #20]), frozen: one image per call (``encode``);
   ``F = ReLU(Conv3x3(concat(layer3, layer4)))`` -> 256 (``multi_level=False``: layer4 only).
2. Cross-reference (2.2): ``a = act(FC_s(GAP(F_s))) * act(FC_q(GAP(F_q)))``, ``G = F * a``; in training the
   shared sub-head D_sub (two 3x3 convs, ASPP from ``blocks.py`` + 1x1 projection, 1x1 to 2) predicts
   QM_sub, SM_sub from G_q, G_s.
3. Conditional module on the encoder features F (2.3). Query branch conditioned on (F_s, M_s); support
   branch on (F_q, M_q) (``support_condition="cross"``, no label leak) or on (F_s, M_s) (``"self"``).
   Global: ``backend.masked_average_pool`` (CANet's ``+5e-4`` area, mask bilinear align_corners) on both
   branches in one call, tiled, ``Y = Conv3x3([F; v])``, ``C_g = Y + Conv(ReLU(Conv(Y)))``. Local (Eqs. 1-3):
   ``backend.local_conditional_attention(theta(F), delta(F_c), Phi(M_c), value=F_c, mode)`` on both branches
   in one call; theta/delta are 1x1 conv + ReLU; ``mode="multiply"`` is Eq. 2 taken literally (default),
   ``"exclude"`` the masked softmax; Phi is the mask resized bilinear align_corners to the grid, >= 0.5.
4. Mask refinement (2.4): ``X = [C_g; F'; G]``, X0 = Conv3x3(X), Gc = ReLU(GCN 1x7/7x1 both orders)(X0),
   then T times ``Z = Conv3x3([X0; Gc; P])`` + residual block, ``L = Conv1x1(Z)``, cache ``P = softmax(L)``
   (detached, zeros at t = 0). Training: ``T ~ U{1..refine_steps_train_max}``, steps < T without grad
   [notes #17]; evaluation: ``refine_steps_test`` (10, paper 5.1).
5. Loss (Eq. 5): ``CE(QM) + CE(SM) + lambda_sub (CE(QM_sub) + CE(SM_sub))``, lambda_sub = 0.1, 2-class
   cross-entropy (= the paper's BCE) on logits upsampled bilinear align_corners to the input, ignore 255.

K shots: training and ``kshot="fusion"`` pair every support with the query (B * K pairs) and average the
probabilities over the shots. ``kshot="finetune"`` / ``"finetune+fusion"`` (evaluation, K >= 2, paper 4.6,
notes 5.3): per episode every module after the encoder is fine-tuned for ``ft_steps`` SGD steps on random
ordered support pairs (i != j, each image flipped with p = 0.5, both branches supervised) from encoder
features computed once (encoder fixed), then the query is predicted with the first support (finetune) or
all of them (finetune+fusion) and the weights are restored. The default stays ``fusion`` (ours): fine-tuning
costs ``ft_steps`` training steps per episode, so the paper's 5-shot mode is asked for explicitly; ``ft_steps``
and ``ft_lr`` are notes #26's values, not tuned on validation classes as notes 5.3 asks (that needs a trained
paper-size model). ``scales`` (evaluation): the pair resized to
``(H - 1) * s + 1`` per scale and the probabilities averaged at the input size (paper 5.3: 0.75, 1, 1.25).
Bounding-box supports (paper 5.4, Tab. 14; notes 5.6, #36) are a data setting, not a model one: trained
with masks, evaluated with ``eval.support_annotation=box`` (``docs/data.md``).

Batch (``docs/architecture.md``): query_img (B, 3, H, W), support_imgs (B, K, 3, H, W), support_masks
(B, K, H, W) int64 (1 fg, 0 bg, 255 ignore: background for conditioning), query_mask (B, H, W) in training.
Output: {"logits": (B, 2, H, W) (bg, fg), "losses": {qm, sm, qm_sub, sm_sub} in training}; in evaluation the
logits are log-probabilities (fused over shots and scales), in training those of the pairs' QM.
"""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import create_backbone, freeze, require_backbone
from .blocks import ASPP, check_one_way_batch
from .params import check_ranges, parse_params
from .registry import register_model

# name: (default, allowed values or type). The model refuses any other key.
PARAMS = {
    "dim": (256, int),
    "multi_level": (True, bool),                    # Tab. 2: layer3 + layer4 (True) or layer4 only
    "cross_reference": (True, bool),                # Tab. 1
    "cr_activation": ("sigmoid", ("sigmoid", "relu", "softmax")),  # Tab. 6
    "cr_shared_fc": (False, bool),
    "cr_fc_layers": (1, (1, 2)),
    "global_condition": (True, bool),               # Tab. 3
    "local_condition": (True, bool),                # Tab. 3
    "local_mask": (True, bool),                     # Tab. 7 (False: all-ones mask)
    "local_mode": ("multiply", ("multiply", "exclude")),
    "support_condition": ("cross", ("cross", "self")),
    "mask_refine": (True, bool),                    # Tab. 2 (False: no cache branch, one step)
    "cache_channels": (2, (1, 2)),
    "refine_steps_test": (10, int),
    "refine_steps_train_max": (4, int),
    "lambda_sub": (0.1, float),
    "scales": ([1.0], list),                        # evaluation; the paper's multi-scale test: [0.75, 1.0, 1.25]
    "kshot": ("fusion", ("fusion", "finetune", "finetune+fusion")),
    "ft_steps": (100, int),
    "ft_lr": (0.0025, float),
    "ft_seed": (0, int),                            # fine-tuning's draws: ft_seed + the episode's index
    "backbone_lr_mult": (0.1, float),               # only with model.freeze_backbone: false (notes #20)
}


def _parse(given: Dict) -> Dict:
    p = parse_params("crcnet", given, {k: d for k, (d, _) in PARAMS.items()})
    for key, value in (given or {}).items():
        rule = PARAMS[key][1]
        if rule is float and isinstance(value, int) and not isinstance(value, bool):
            p[key] = value = float(value)
        # True == 1 and 2.0 == 2: a choice must also have its choices' type (a bool ran as 1, a float crashed in Conv2d)
        ok = (value in rule and type(value) in {type(c) for c in rule}) if isinstance(rule, tuple) else \
            isinstance(value, rule) and not (rule is int and isinstance(value, bool))
        if not ok:
            raise ValueError(f"crcnet: model.params.{key} must be "
                             f"{'one of ' + str(rule) if isinstance(rule, tuple) else rule.__name__}, got {value!r}")
    if min(p["refine_steps_test"], p["refine_steps_train_max"], p["dim"], p["ft_steps"]) < 1:
        raise ValueError("crcnet: dim, refine_steps_test, refine_steps_train_max and ft_steps must be >= 1")
    check_ranges("crcnet", p, non_negative=("lambda_sub", "backbone_lr_mult"), positive=("ft_lr",))
    if not p["scales"] or any(not isinstance(s, (int, float)) or isinstance(s, bool) or s <= 0
                                 for s in p["scales"]):
        raise ValueError(f"crcnet: model.params.scales must be a non-empty list of positive numbers, got {p['scales']}")
    if not (p["cross_reference"] or p["global_condition"] or p["local_condition"]):
        raise ValueError("crcnet: cross_reference, global_condition and local_condition are all off: nothing to "
                         "predict from")
    return p


def _conv(cin, cout, k=3, relu=True, padding=None):
    """Conv with bias [+ ReLU]: the paper's "3x3, 256 channels, followed by ReLU" unless it names another."""
    pad = k // 2 if padding is None else padding
    conv = nn.Conv2d(cin, cout, k, padding=pad)
    return nn.Sequential(conv, nn.ReLU(inplace=True)) if relu else conv


class Residual(nn.Module):
    """``x + Conv3x3_lin(ReLU(Conv3x3(x)))`` (CANet's ``residule1``; GC4 and MR6 of the notes)."""

    def __init__(self, dim):
        super().__init__()
        self.body = nn.Sequential(_conv(dim, dim), _conv(dim, dim, relu=False))

    def forward(self, x):
        return x + self.body(x)


class GlobalConvBlock(nn.Module):
    """Large-kernel GCN block (Peng et al. [41]): ReLU(7x1(1x7(x)) + 1x7(7x1(x))), linear inner convs (MR3)."""

    def __init__(self, dim, k=7):
        super().__init__()
        row = lambda: nn.Conv2d(dim, dim, (1, k), padding=(0, k // 2))  # noqa: E731
        col = lambda: nn.Conv2d(dim, dim, (k, 1), padding=(k // 2, 0))  # noqa: E731
        self.a, self.b = nn.Sequential(row(), col()), nn.Sequential(col(), row())

    def forward(self, x):
        return F.relu(self.a(x) + self.b(x))


@register_model("crcnet")
class CRCNet(nn.Module):
    """CRCNet few-shot segmenter; the module docstring gives the forward order, the batch and the outputs."""

    def __init__(self, cfg, backend):
        super().__init__()
        p = self.p = _parse(dict(cfg.params or {}))
        self.backend = backend
        kw = {"dilation": "torchvision"} if cfg.backbone.startswith("resnet") else {}  # notes 2.1
        require_backbone(cfg.backbone, "crcnet")
        self.backbone = create_backbone(cfg.backbone, weights=cfg.weights, frozen_bn=True, **kw)
        self.frozen_backbone = cfg.freeze_backbone
        if self.frozen_backbone:
            freeze(self.backbone)
        ch, d = self.backbone.channels, p["dim"]
        self.reduce = _conv(ch["layer3"] + ch["layer4"] if p["multi_level"] else ch["layer4"], d)
        width = 0
        if p["cross_reference"]:
            fc = lambda: (nn.Linear(d, d) if p["cr_fc_layers"] == 1 else  # noqa: E731
                          nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, d)))
            self.fc_s = fc()
            self.fc_q = self.fc_s if p["cr_shared_fc"] else fc()
            self.sub_head = nn.Sequential(_conv(d, d), _conv(d, d), ASPP(d, d), _conv(5 * d, d, 1),
                                          _conv(d, 2, 1, relu=False))
            width += d
        if p["global_condition"]:
            self.gc_fuse, self.gc_res = _conv(2 * d, d), Residual(d)
            width += d
        if p["local_condition"]:
            self.theta, self.delta = _conv(d, d, 1), _conv(d, d, 1)
            width += d
        self.mr_in, self.mr_gcn = _conv(width, d), GlobalConvBlock(d)
        cache = p["cache_channels"] if p["mask_refine"] else 0
        self.mr_combine = nn.Sequential(_conv(2 * d + cache, d), Residual(d))
        self.mr_cls = _conv(d, 2, 1, relu=False)

    # ----------------------------------------------------------------------------------------- setup
    def param_groups(self, train_cfg=None):
        """Every trainable parameter at train.lr; a trainable backbone at ``backbone_lr_mult`` x train.lr."""
        backbone = [q for q in self.backbone.parameters() if q.requires_grad]
        ids = {id(q) for q in backbone}
        rest = [q for q in self.parameters() if q.requires_grad and id(q) not in ids]
        return [{"params": rest}, {"params": backbone, "lr_mult": self.p["backbone_lr_mult"]}]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> F (N, dim, h, w): the Siamese encoder (2.1), the backbone without grad when frozen.
        A backbone that keeps nothing for backward (frozen, or no grad) runs one image per call: a call on more
        images only multiplies its transient peak, which is the whole inference's (ResNet-50 at 473, OS 8, batch
        2, 1-shot, fused: 230 MB with two images per call, 142 MB with one; PFENet's and BAM's code call it per role).
        A trained backbone runs once on all images: it keeps every activation for backward either way."""
        keeps_graph = torch.is_grad_enabled() and not self.frozen_backbone
        feats = []
        for chunk in images.split(len(images) if keeps_graph else 1):
            with torch.set_grad_enabled(keeps_graph):
                out = self.backbone(chunk, layers=("layer3", "layer4") if self.p["multi_level"] else ("layer4",))
            x = torch.cat([out["layer3"], out["layer4"]], 1) if self.p["multi_level"] else out["layer4"]
            del out  # the layer3 / layer4 maps go before reduce allocates its output,
            feats.append(self.reduce(x))
            del x    # and the concat before the next chunk's backbone pass
        return torch.cat(feats)

    # ----------------------------------------------------------------------------------------- modules
    def cross_reference(self, fs, fq):
        """(CR1-CR4): fs, fq (n, C, h, w) -> G_s, G_q re-weighted by the co-occurrence vector a_s * a_q."""
        act = {"sigmoid": torch.sigmoid, "relu": F.relu, "softmax": lambda t: t.softmax(1)}[self.p["cr_activation"]]
        a = act(self.fc_s(fs.mean((2, 3)))) * act(self.fc_q(fq.mean((2, 3))))
        return fs * a[..., None, None], fq * a[..., None, None]

    def conditions(self, target, cond, cond_mask):
        """Conditional module (2.3) for n branches at once: target, cond (n, C, h, w) encoder features, cond_mask
        (n, H, W) float {0, 1} -> list of [C_g] and [F'] (n, C, h, w) as switched on."""
        out = []
        if self.p["global_condition"]:   # GC1-GC4
            v = self.backend.masked_average_pool(cond, cond_mask[:, None], resize="mask")  # (n, 1, C)
            y = self.gc_fuse(torch.cat([target, v[:, 0, :, None, None].expand_as(target)], 1))
            out.append(self.gc_res(y))
        if self.p["local_condition"]:    # Eqs. 1-3
            if self.p["local_mask"]:     # Phi(M): exact point samples at 8k+1 inputs, else thresholded
                grid = F.interpolate(cond_mask[:, None], cond.shape[-2:], mode="bilinear", align_corners=True)
                grid = (grid[:, 0] >= 0.5).to(cond.dtype)
            else:
                grid = cond.new_ones(cond.shape[0], *cond.shape[-2:])
            local = self.backend.local_conditional_attention(
                self.theta(target).flatten(2), self.delta(cond).flatten(2), grid.flatten(1),
                value=cond.flatten(2), mode=self.p["local_mode"])
            out.append(local.view_as(target))
        return out

    def refine(self, x, steps):
        """Mask refinement (2.4): x (n, width, h, w) -> logits (n, 2, h, w) of step ``steps``; the cache holds
        the previous step's softmax (detached: steps before the last run without grad)."""
        x0 = self.mr_in(x)
        feat = torch.cat([x0, self.mr_gcn(x0)], 1)
        if not self.p["mask_refine"]:
            return self.mr_cls(self.mr_combine(feat))
        # Conv3x3([feat; P]) = Conv_feat(feat) + Conv_P(P): only P changes between steps, so the feat part (512 of
        # the 514 input channels) runs once, not per step (ResNet-50 at 473, batch 2, 10 steps, CPU: the refinement
        # takes 0.8 s instead of 1.2 s of a 4.7 s inference)
        c = self.p["cache_channels"]
        (conv, relu), residual = self.mr_combine
        w_feat, w_cache = conv.weight.split([feat.shape[1], c], 1)
        fixed = F.conv2d(feat, w_feat, conv.bias, padding=conv.padding)

        def step(cache):
            return self.mr_cls(residual(relu(fixed + F.conv2d(cache, w_cache, padding=conv.padding))))

        cache = x.new_zeros(x.shape[0], c, *x.shape[-2:])
        with torch.no_grad():
            for _ in range(steps - 1):
                cache = step(cache).softmax(1)[:, 2 - c:]
        return step(cache)

    def pair(self, fs, fq, ms, mq=None, steps=1):
        """One forward of n (support, query) pairs on encoder features fs, fq (n, C, h, w) with float {0, 1}
        masks ms, mq (n, H, W). With mq (training, fine-tuning) both branches run and the dict holds qm, sm
        and, with cross-reference, qm_sub, sm_sub; without mq only the query branch: {"qm"}. (n, 2, h, w) each."""
        n, both = fq.shape[0], mq is not None
        out, parts = {}, []
        if both and self.p["support_condition"] == "cross":
            target, cond, cmask = torch.cat([fq, fs]), torch.cat([fs, fq]), torch.cat([ms, mq])
        elif both:
            target, cond, cmask = torch.cat([fq, fs]), torch.cat([fs, fs]), torch.cat([ms, ms])
        else:
            target, cond, cmask = fq, fs, ms
        parts += self.conditions(target, cond, cmask)
        if self.p["cross_reference"]:
            gs, gq = self.cross_reference(fs, fq)
            parts.append(torch.cat([gq, gs]) if both else gq)
            if both:
                out["qm_sub"], out["sm_sub"] = self.sub_head(torch.cat([gq, gs])).split(n)
        logits = self.refine(torch.cat(parts, 1), steps)
        if both:
            out["qm"], out["sm"] = logits.split(n)
        else:
            out["qm"] = logits
        return out

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, batch: Dict) -> Dict:
        query, supports, labels = check_one_way_batch("crcnet", batch, self.training,
                                                       same_size="the cross-reference compares one grid")
        B, K = labels.shape[:2]
        if self.training:
            qlabel = batch["query_mask"].repeat_interleave(K, 0)
            feats = self.encode(torch.cat([query, supports.flatten(0, 1)]))
            fq, fs = feats[:B].repeat_interleave(K, 0), feats[B:]
            out = self.pair(fs, fq, (labels.flatten(0, 1) == 1).to(fs.dtype), (qlabel == 1).to(fs.dtype),
                            self._train_steps())
            up = self._up(query.shape[-2:])
            probs = up(out["qm"]).softmax(1).view(B, K, 2, *query.shape[-2:]).mean(1)
            return {"logits": probs.clamp_min(1e-12).log(),
                    "losses": self.losses(out, qlabel, labels.flatten(0, 1), query.shape[-2:])}
        if self.p["kshot"] != "fusion":
            if K < 2:
                raise ValueError(f"crcnet: kshot={self.p['kshot']!r} needs >= 2 support images (paper Tab. 4: "
                                 f"N/A at 1-shot), the batch has {K}")
            index = batch.get("index")
            probs = torch.cat([self._finetune_predict(query[b:b + 1], supports[b:b + 1], labels[b:b + 1],
                                                      0 if index is None else int(index[b])) for b in range(B)])
        else:
            probs = self.predict(query, supports, labels)
        return {"logits": probs.clamp_min(1e-12).log()}

    def losses(self, out, qlabel, slabel, size):
        """Eq. 5 on the pairs' logits (n, 2, h, w) upsampled to ``size``; labels (n, H, W), 255 ignored."""
        up = self._up(size)
        ce = lambda logits, y: F.cross_entropy(up(logits).float(), y, ignore_index=255)  # noqa: E731
        losses = {"qm": ce(out["qm"], qlabel), "sm": ce(out["sm"], slabel)}
        if "qm_sub" in out:
            lam = self.p["lambda_sub"]
            losses.update(qm_sub=lam * ce(out["qm_sub"], qlabel), sm_sub=lam * ce(out["sm_sub"], slabel))
        return losses

    @torch.no_grad()
    def predict(self, query, supports, labels):
        """Query probabilities (B, 2, H, W): every support paired with the query, ``refine_steps_test`` steps,
        averaged over the shots (fusion) and over ``scales``."""
        B, K, size = labels.shape[0], labels.shape[1], query.shape[-2:]
        total = 0
        for s in self.p["scales"]:
            q, sup, m = query, supports.flatten(0, 1), labels.flatten(0, 1)
            if s != 1:
                hw = tuple(int(round((n - 1) * s)) + 1 for n in size)
                q = F.interpolate(q, hw, mode="bilinear", align_corners=True)
                sup = F.interpolate(sup, hw, mode="bilinear", align_corners=True)
                m = F.interpolate(m[:, None].float(), hw, mode="nearest")[:, 0].long()
            feats = self.encode(torch.cat([q, sup]))
            fq, fs = feats[:B].repeat_interleave(K, 0), feats[B:]
            logits = self.pair(fs, fq, (m == 1).to(fs.dtype), steps=self.p["refine_steps_test"])["qm"]
            total = total + self._up(size)(logits).softmax(1).view(B, K, 2, *size).mean(1)
        return total / len(self.p["scales"])

    def _finetune_predict(self, query, supports, labels, index: int):
        """k-shot fine-tuning for one episode (notes 5.3): query (1, 3, H, W), supports (1, K, 3, H, W), labels
        (1, K, H, W) -> probabilities (1, 2, H, W); every weight and its gradient is restored before returning.
        Its pairs, flips, refinement steps and dropout draw from ft_seed + the episode's index, under a forked
        RNG: an episode scores the same on any rank and in any order, and a validation inside training leaves
        the training's random stream where it was."""
        K, size = labels.shape[1], query.shape[-2:]
        tuned = [(n, q) for n, q in self.named_parameters() if q.requires_grad and not n.startswith(("backbone.",
                                                                                                      "reduce."))]
        saved = {n: q.detach().clone() for n, q in tuned}
        # the caller's gradients too: a validation between a training step's zero_grad and the next must not hand
        # that step one episode's fine-tuning gradient
        saved_grads = {n: q.grad for n, q in tuned}
        imgs, lab = supports[0], labels[0]
        with torch.no_grad():  # the encoder is fixed: its features of each support and its mirror image, once
            feats = self.encode(torch.cat([imgs, imgs.flip(-1)]))
        lab = torch.cat([lab, lab.flip(-1)])
        masks = (lab == 1).to(feats.dtype)
        opt = torch.optim.SGD([q for _, q in tuned], lr=self.p["ft_lr"], momentum=0.9, weight_decay=5e-4)
        was_training = self.training
        self.train()
        try:
            # float32 whatever the caller's autocast: autocast casts each weight once per region and reuses the
            # copy, so every step inside it would run on the weights before the first (and fp16 would need a
            # gradient scaler); the features are only read, so casting them up loses nothing
            feats, masks = feats.float(), masks.float()
            devices = [query.device.index or 0] if query.device.type == "cuda" else []
            with torch.enable_grad(), torch.autocast(query.device.type, enabled=False), \
                    torch.random.fork_rng(devices=devices):
                torch.manual_seed(self.p["ft_seed"] + index)
                for _ in range(self.p["ft_steps"]):
                    i, j = torch.randperm(K)[:2].tolist()             # an ordered pair, i != j
                    i, j = [x + K * int(torch.rand(()) < 0.5) for x in (i, j)]  # flipped with p = 0.5
                    out = self.pair(feats[i:i + 1], feats[j:j + 1], masks[i:i + 1], masks[j:j + 1],
                                    self._train_steps())
                    opt.zero_grad(set_to_none=True)
                    sum(self.losses(out, lab[j:j + 1], lab[i:i + 1], size).values()).backward()
                    opt.step()
            self.train(was_training)
            first = 1 if self.p["kshot"] == "finetune" else K
            torch.clear_autocast_cache()  # the prediction casts the tuned weights, not copies made before
            return self.predict(query, supports[:, :first], labels[:, :first])
        finally:
            self.train(was_training)
            with torch.no_grad():
                for n, q in tuned:
                    q.copy_(saved[n])
                    q.grad = saved_grads[n]
            torch.clear_autocast_cache()  # and the next episode the restored ones

    # ----------------------------------------------------------------------------------------- helpers
    def _train_steps(self):
        if not self.p["mask_refine"]:
            return 1
        return int(torch.randint(1, self.p["refine_steps_train_max"] + 1, ()))

    @staticmethod
    def _up(size):
        return lambda t: F.interpolate(t, size, mode="bilinear", align_corners=True)

