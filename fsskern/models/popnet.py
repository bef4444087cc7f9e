"""POPNet (He, Zhang, Thuraisingham, Tao, "Progressive One-Shot Human Parsing", AAAI 2021).

Spec: ``../shared/papers/popnet.txt`` and ``../shared/notes/methods/popnet.md`` (section and item numbers
below). The public code (``Charleshhy/One-shot-Human-Parsing``, ``networks/popnet.py``) ships the DML heads
but no three-stage driver; the heads follow it where the paper is silent.

Three stages, each with its own DeepLabV3+ encoder g (stride 4, 256 channels, ``create_backbone``)::

    stage 1  g1 = E1(I) --1x1 conv--> fg/bg logits                      supervised CE on query + support
    stage 2  h2 = KIM2([g1; g2]) --DML over the body areas-->  area logits (query_areas / support_areas)
    stage 3  h3 = KIM3([h2; g3]) --DML over the episode's ways--> logits (B, ways + 1, H, W)
    DML      P, n = backend.class_prototypes(h_s, support labels, K + 1, resize="nearest")   Eq. 1, one call
             p^ = static P, or the dynamic bank (Eq. 2); m = cos(h_q, p^) (blocks.cosine_logits, scale 1)
             AGM: r_c = m_c h_q + h_q -> D -> 1x1 conv -> (phi, omega); bg = affine(mean_c omega)   Eq. 3
             NCM: fg = s (a m_c + b); bg = s (a' mean_c (a'' (1 - m_c) + b'') + b'), s init 10       Eq. 4
             loss = beta CE(AGM) + (1 - beta) CE(NCM), beta = 1 - epoch / epochs                     Eq. 5

``params.stage`` (1, 2, 3) selects the stage trained; the earlier ones are frozen (no gradient, BN in eval
mode). Every stage's modules exist in every stage, so the engine's phase chaining (a strict load of the
previous phase's ``last.pt``) carries the trained stages forward. The output of stage 1 is its fg/bg logits
(B, 2, H, W) and of stage 2 its area logits (B, areas + 1, H, W): only stage 3 is an episodic model in the
sense of docs/architecture.md; its logits are (B, ways + 1, H, W), channel 0 background.

Support labels: one-shot k-way episodes carry the same support image once per way with a binary mask each
(batch contract); they are merged into one label map (way w -> w + 1) and the image is encoded once. When
the ways have their own support images (one-way, or k-way from per-class supports), each support image is
encoded and the same single ``class_prototypes`` call pools all of them; shots of a way are merged by pixel
count (the mean over all the way's pixels).

Resolutions (source: paper, notes = ../shared/notes/methods/popnet.md, code = public code, ours):
- R1 encoder: DeepLabV3+ ``decoder`` output of a registered backbone: the paper's aligned Xception-65
  (``deeplabv3plus_xception65``; the backbone of the code's COCO-pretrained checkpoint loads from a file, its ASPP /
  decoder do not: ours use plain atrous convs; notes D4), ResNet-50 or MobileNetV2; g1 is the feature before
  stage 1's 1x1 classifier (paper "features before the classification layer"). ``width``: the ASPP / decoder
  channels K (paper and code 256; the CPU recipes 128, which makes the AGM decoder, the step's largest cost, 4x
  cheaper: ours).
- R2 KIM: two separable 3x3 blocks (depthwise + BN + ReLU, pointwise + BN + ReLU), 512 -> 256 -> 256; the
  previous stage's features bilinearly resized (align_corners=True) when grids differ (code; notes 2.3).
  ``kim=False`` (ablation "without KIM") is one encoder and DML on g3 directly (notes 4, ablations).
- R3 stage-1 labels: fg = every labelled pixel of the raw labels, novel classes included (``query_human`` /
  ``support_human`` from the loader; notes A2, code; the paper: "cause no harm to the potential novel
  classes"). ``fg_excludes_novel=True`` is A2's strict protocol: fg = any base-class area > 0. Batches with
  neither (no hierarchy) use the way masks > 0. The CPU recipe first ran the strict one (novel mIoU 3.6).
- R4 stage-2 labels: the support's areas restricted to the pixels the support annotates; the query target
  the areas of the pixels the episode parses (query_mask > 0); areas absent from the support grid -> 0
  (paper "merge these classes into background"; ours for the restriction).
- R5 prototypes: ``class_prototypes(resize="nearest")``, no eps, absent class -> zero prototype, 255 in no
  class (code, notes 2.8, C3). Presence = count on the grid > 0 (notes 2.8); a way absent from the support
  grid is background in the training target (notes C2); evaluation scores the full ground truth (ours).
- R6 dynamic prototypes: one bank slot per class id (stage 3: dataset class id from ``batch["classes"]``;
  stage 2: area id), buffers ``bank_s{2,3}`` and ``seen_s{2,3}`` (in the checkpoint). Training: image by image
  p^ = (1 - rate) bank + rate p (bank detached), then bank <- p^ detached; the first write of a slot is an
  overwrite; rate 0.001 (code form of Eq. 2, notes B1); the CPU recipes set 0.05 (ours: at 0.001 over 300
  iterations the bank keeps its first write, made by the untrained encoder). The EMA runs from the first
  iteration while the maps use static prototypes for the first ``static_epochs`` of ``epochs`` (paper 15 of 30;
  notes B2 default). Evaluation: seen (base) slots use (1 - rate) bank + rate p, unseen (novel) slots the
  static p, no update (paper "static prototypes for the novel classes"; code). Several GPUs: after each
  step's writes every rank applies all ranks' writes in rank order, so the bank is one (ours; the paper uses
  one GPU).
- R7 epochs: the engine counts iterations, so each stage keeps its own training-step counter (buffer
  ``steps``, one per stage, in the checkpoint) and epoch = floor(step * epochs / iters): ``iters`` is the
  stage's ``train.iters`` (paper: 30 epochs x 4000 iterations). beta = 1 - epoch / epochs (paper; notes 3.1).
- R8 softmax (Eq. 3/4): r_bg and m_bg are background logits of one softmax (notes B3); only classes present
  in each support take part, absent ways get logit -1e4 (exp underflows to 0 in fp32/bf16/fp16; -inf would
  turn into NaN under bilinear resizing) and the bg mean runs over the present ones (notes B5 "present").
  A support with no class predicts background everywhere and its loss is 0 (notes A7).
- R9 AGM D = two plain 3x3 convs (bias) + one separable block, then a 1x1 conv 256 -> 2 (phi, omega), shared
  over classes; bg = a mean(omega) + b (code, notes B6). Classes are folded into the batch and only the
  present (image, class) pairs are decoded (ours; the same values in evaluation; in training with batch_stats the
  separable block's BatchNorm takes its statistics over the present pairs only).
- R10 NCM: the code's scalar affines and learnable scale s (init 10) (notes B4); ``ncm_affine=False`` is the
  paper's plain softmax over s m_c and s mean(1 - m_c), s still learnable.
- R11 output: NCM logits (code evaluates NCM; beta -> 0; notes B9); AGM is skipped at inference. ``head``:
  ``dml`` (both, weight shifting), ``agm`` (beta = 1, output AGM), ``ncm`` (beta = 0); ``weight_shift=False``
  gives constant beta = 0.5 (paper Table 3). ``dynamic=False``: static prototypes throughout.
- R12 losses: CE at the input resolution after bilinear upsampling (align_corners=True), 255 ignored, mean
  over pixels (code). One-way uses the k-way heads with one class (ours; the code has separate 1-way heads).
  ``bg_weight`` weights the background class in the stage-2/3 CEs (1 = the paper's plain CE; ours): the CPU
  recipes' stage 3 takes 0.1, since in 300 iterations the plain CE fits the labels' ~85 % background and the NCM
  head then calls most novel (and base) pixels background.
- R17 BN of the new layers (ASPP, decoder, KIM, AGM): ``batch_stats=True`` trains them on batch statistics with
  query and support in separate forward calls, each its own statistics (code; notes 7). With batch 2 this
  normalises two images by their own mean while evaluation uses the running mean of both calls: two real MSRC-v2
  episodes fitted to train-mode IoU 0.99 scored 0.45 in eval mode. ``batch_stats=False`` (notes 7's option; ours)
  keeps every BN at its initial statistics (mean 0, var 1), a learnable per-channel affine, the same in training
  and evaluation: the over-fit test uses it. The recipes keep batch statistics: the one-stage CCP recipe with
  fixed ones scored human mIoU 4.0 against 9.9 (fold 0, 300 steps).
- R18 backbone BN frozen (``frozen_bn=True``: running statistics and affines fixed; ours); notes 4 item 7: the
  code's encoder runs on batch statistics too, which ``frozen_bn=False`` gives.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..backbones import create_backbone, fix_bn, freeze, require_backbone
from .blocks import ABSENT, IGNORE, check_labels, cosine_logits
from .params import check_ranges, parse_params
from .registry import register_model


def separable_block(cin: int, cout: int) -> nn.Sequential:
    """Depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU (POPNet code ``SeparableConv2d`` blocks)."""
    return nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                         nn.ReLU(inplace=True), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class KnowledgeInfusion(nn.Module):
    """zeta([prev; cur]): (B, C, h, w) x 2 -> (B, C, h, w) (R2)."""

    def __init__(self, channels: int = 256):
        super().__init__()
        self.fuse = nn.Sequential(separable_block(2 * channels, channels), separable_block(channels, channels))

    def forward(self, prev: torch.Tensor, cur: torch.Tensor) -> torch.Tensor:
        if prev.shape[-2:] != cur.shape[-2:]:
            prev = F.interpolate(prev, size=cur.shape[-2:], mode="bilinear", align_corners=True)
        return self.fuse(torch.cat([prev, cur], 1))


class Affine(nn.Module):
    """a x + b with scalars a (init 1), b (init 0): the code's 1x1 conv 1 -> 1."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Parameter(torch.ones(())), nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.a * x + self.b


class DualMetricHead(nn.Module):
    """AGM (Eq. 3) and NCM (Eq. 4) on cosine maps.

    forward(h_q (B, C, h, w), maps m (B, K, h, w), present (B, K) bool, agm: bool) ->
    (AGM logits or None, NCM logits), each (B, K + 1, h, w), channel 0 background (R8-R10).
    """

    def __init__(self, channels: int = 256, ncm_affine: bool = True, scale_init: float = 10.0):
        super().__init__()
        self.decoder = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1),
                                     nn.Conv2d(channels, channels, 3, padding=1), separable_block(channels, channels))
        self.phi_omega = nn.Conv2d(channels, 2, 1)
        self.agm_bg = Affine()
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        self.ncm_fg, self.ncm_rev, self.ncm_bg = (Affine(), Affine(), Affine()) if ncm_affine else (None,) * 3

    @staticmethod
    def _with_bg(bg: torch.Tensor, fg: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        fg = torch.where(present[:, :, None, None], fg, torch.full_like(fg, ABSENT))
        return torch.cat([bg[:, None], fg], 1)

    def agm(self, h_q: torch.Tensor, m: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        B, K, h, w = m.shape
        b_idx, k_idx = present.nonzero(as_tuple=True)
        r = h_q[b_idx] * (1 + m[b_idx, k_idx][:, None])  # r_c = m_c h + h, present (image, class) pairs only
        out = self.phi_omega(self.decoder(r))  # (P, 2, h, w)
        fg = m.new_zeros(B, K, h, w).index_put((b_idx, k_idx), out[:, 0])
        omega = m.new_zeros(B, h, w).index_add(0, b_idx, out[:, 1])
        bg = self.agm_bg(omega / present.sum(1).clamp(min=1)[:, None, None])
        return self._with_bg(bg, fg, present)

    def ncm(self, m: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        weights = present[:, :, None, None].to(m.dtype)
        rev = 1 - m if self.ncm_rev is None else self.ncm_rev(1 - m)
        bg = (rev * weights).sum(1) / present.sum(1).clamp(min=1)[:, None, None]
        fg = m if self.ncm_fg is None else self.ncm_fg(m)
        bg = bg if self.ncm_bg is None else self.ncm_bg(bg)
        # scaled before the absent ways are set: -1e4 * s would leave fp16's range (-inf, then NaN when resized)
        return self._with_bg(self.scale * bg, self.scale * fg, present)

    def forward(self, h_q, m, present, agm: bool, ncm_grad: bool = True):
        agm_logits = self.agm(h_q, m, present) if agm else None
        with torch.set_grad_enabled(torch.is_grad_enabled() and ncm_grad):
            return agm_logits, self.ncm(m, present)


@torch.no_grad()
def share_bank_writes(bank: torch.Tensor, seen: torch.Tensor, writes) -> None:
    """Every rank applies every rank's bank writes of this step, in rank order (a slot two ranks wrote keeps the
    later rank's value), so the banks stay one (R6): DDP broadcasts rank 0's buffers at every step, which would
    otherwise drop the other ranks' writes. ``writes``: this rank's [(slot, value)]."""
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, [(slot, value.cpu()) for slot, value in writes])
    for part in parts:
        for slot, value in part:
            bank[slot] = value.to(bank.device, bank.dtype)
            seen[slot] = True


def merge_support_labels(masks: torch.Tensor, ways: int) -> torch.Tensor:
    """(N, S, H, W) binary way masks (way-major slots, 1 = the slot's way, 255 ignore) -> (N, S, H, W) label
    maps holding way w as w + 1 (0 elsewhere, 255 kept)."""
    shots = masks.shape[1] // ways
    way_ids = torch.arange(1, ways + 1, device=masks.device).repeat_interleave(shots).view(1, -1, 1, 1)
    return torch.where(masks == 1, way_ids, torch.where(masks == IGNORE, IGNORE, 0))


@register_model("popnet")
class POPNet(nn.Module):
    metric = "parsing"  # the evaluator scores it with POPNet's confusion-matrix metrics (engine/parsing_eval.py)
    # Which parameters a step trains depends on the epoch (NCM's loss weight is 0 in the first, R7) and on
    # ``head`` (R11): DDP must look for the unused ones (the trainer reads this)
    ddp_find_unused_parameters = True
    DEFAULTS = {"stage": 3, "kim": True, "head": "dml", "weight_shift": True, "dynamic": True, "rate": 0.001,
                "epochs": 30, "static_epochs": 15, "iters": 120000, "areas": 4, "bank_size": 256,
                "ncm_affine": True, "ncm_scale_init": 10.0, "frozen_bn": True, "batch_stats": True,
                "output_stride": 16, "width": 256, "fg_excludes_novel": False, "bg_weight": 1.0}

    def __init__(self, cfg, backend):
        super().__init__()
        p = self.p = parse_params("popnet", cfg.params, self.DEFAULTS)
        if p["stage"] not in (1, 2, 3) or (not p["kim"] and p["stage"] != 3):
            raise ValueError(f"popnet: params.stage must be 1, 2 or 3 (3 only with kim=False), got {p['stage']}")
        if p["head"] not in ("dml", "agm", "ncm"):
            raise ValueError(f"popnet: params.head must be dml, agm or ncm, got {p['head']!r}")
        check_ranges("popnet", p, unit=("rate",))
        if not 0 < p["bg_weight"] < float("inf"):  # 0 makes a query of background alone a 0 / 0 loss
            raise ValueError(f"popnet: params.bg_weight must be finite and > 0, got {p['bg_weight']}")
        self.backend, self.stage = backend, p["stage"]
        stages = (1, 2, 3) if p["kim"] else (3,)

        require_backbone(cfg.backbone, "popnet", deeplab=True)

        def encoder():
            enc = create_backbone(cfg.backbone, weights=cfg.weights, frozen_bn=p["frozen_bn"],
                                  output_stride=p["output_stride"], width=p["width"])
            if cfg.freeze_backbone:
                freeze(enc.backbone)
            return enc

        self.encoders = nn.ModuleDict({str(s): encoder() for s in stages})
        C = self.encoders["3"].channels["decoder"]
        if p["kim"]:
            self.fg_classifier = nn.Conv2d(C, 2, 1)
            self.kim = nn.ModuleDict({"2": KnowledgeInfusion(C), "3": KnowledgeInfusion(C)})
        self.heads = nn.ModuleDict({str(s): DualMetricHead(C, p["ncm_affine"], p["ncm_scale_init"])
                                    for s in stages if s > 1})
        for s in self.heads:
            self.register_buffer(f"bank_s{s}", torch.zeros(p["bank_size"], C))
            self.register_buffer(f"seen_s{s}", torch.zeros(p["bank_size"], dtype=torch.bool))
        self.register_buffer("steps", torch.zeros(4, dtype=torch.long))  # training steps per stage (R7)
        self.frozen = [m for name, m in self._stage_modules().items() if name != self.stage]
        for m in self.frozen:
            freeze(m)

    def _stage_modules(self) -> Dict[int, nn.Module]:
        """The modules each stage trains; ``kim=False`` has stage 3 only."""
        if not self.p["kim"]:
            return {3: nn.ModuleList([self.encoders["3"], self.heads["3"]])}
        return {1: nn.ModuleList([self.encoders["1"], self.fg_classifier]),
                2: nn.ModuleList([self.encoders["2"], self.kim["2"], self.heads["2"]]),
                3: nn.ModuleList([self.encoders["3"], self.kim["3"], self.heads["3"]])}

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.frozen:  # earlier (and later) stages stay in eval mode: BN statistics fixed
            m.eval()
        if not self.p["batch_stats"]:  # R17: every BN normalises with its running statistics, never updated
            fix_bn(self)
        return self

    # ---- features --------------------------------------------------------------------------------------
    def features(self, images: torch.Tensor, upto: int) -> Dict[int, torch.Tensor]:
        """(N, 3, H, W) -> {stage: g1 or h2 / h3} up to stage ``upto``; frozen stages run without grad."""
        out = {}
        if not self.p["kim"]:
            return {3: self.encoders["3"](images)["decoder"]}
        for s in range(1, upto + 1):
            with torch.set_grad_enabled(torch.is_grad_enabled() and s == self.stage):
                g = self.encoders[str(s)](images)["decoder"]
                out[s] = g if s == 1 else self.kim[str(s)](out[s - 1], g)
        return out

    # ---- prototypes (R5, R6) -----------------------------------------------------------------------------
    def prototypes(self, stage: int, h_s: torch.Tensor, labels: torch.Tensor, K: int, keys: torch.Tensor,
                   B: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """h_s (N, C, h, w) with labels (N, H, W) in 0..K / 255 (N = B x images per episode) -> prototypes
        (B, K, C) and presence (B, K); ``keys`` (B, K) bank slots of the classes."""
        protos, counts = self.backend.class_prototypes(h_s, labels, K + 1, resize="nearest")
        protos, counts = protos[:, 1:].unflatten(0, (B, -1)), counts[:, 1:].unflatten(0, (B, -1))
        total = counts.sum(1)  # shots / per-way images merged by pixel count
        protos = (protos * counts[..., None]).sum(1) / total.clamp(min=1)[..., None]
        present = total > 0
        if not self.p["dynamic"]:
            return protos, present
        bank, seen = getattr(self, f"bank_s{stage}"), getattr(self, f"seen_s{stage}")
        if keys.min() < 0 or keys.max() >= len(bank):
            raise ValueError(f"popnet: class ids must lie in [0, bank_size={len(bank)}), got {keys.tolist()}")
        rate, update = self.p["rate"], self.training and stage == self.stage
        static = update and self.epoch() < self.p["static_epochs"]
        out, writes = [], []
        for b in range(B):  # image by image: the next image sees the bank this one wrote (code)
            rows = []
            for k in range(K):
                p, slot = protos[b, k], int(keys[b, k])
                if present[b, k] and seen[slot]:
                    dyn = (1 - rate) * bank[slot] + rate * p
                else:
                    dyn = p
                rows.append(p if static else dyn)
                if update and present[b, k]:
                    with torch.no_grad():
                        bank[slot] = dyn.detach().to(bank.dtype)
                        seen[slot] = True
                    writes.append((slot, bank[slot].clone()))
            out.append(torch.stack(rows))
        if update and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            share_bank_writes(bank, seen, writes)
        return torch.stack(out), present

    @property
    def scheduled_calls(self) -> int:
        """The training forward calls per stage that the static phase and beta are counted against (params.iters,
        counted by ``steps``): the trainer refuses a run that makes another number (train.iters x accumulate),
        whose static phase would otherwise end early or late without a word."""
        return self.p["iters"]

    def epoch(self) -> int:
        return int(self.steps[self.stage]) * self.p["epochs"] // max(1, self.p["iters"])

    def beta(self) -> float:
        head = self.p["head"]
        if head != "dml":
            return 1.0 if head == "agm" else 0.0
        if not self.p["weight_shift"]:
            return 0.5
        return 1.0 - min(self.epoch(), self.p["epochs"] - 1) / self.p["epochs"]

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(self, batch: dict) -> dict:
        query, supports, masks = batch["query_img"], batch["support_imgs"], batch["support_masks"]
        B, S = masks.shape[:2]
        ways = batch["classes"].shape[1]
        self._check(batch, B, S, ways)
        if self.training and B == 1 and self.p["batch_stats"]:  # torch's own error names no setting
            raise ValueError("popnet: training with batch_stats=True needs at least 2 queries per batch (the "
                             "query's own encoder pass normalises the ASPP's image-pooling branch, one value per "
                             "channel and image, over the batch); set data.batch_size >= 2 or "
                             "model.params.batch_stats=false")
        size = query.shape[-2:]
        shared = S > 1 and bool((supports == supports[:, :1]).all())  # one k-way support image for every way
        s_imgs = supports[:, 0] if shared else supports.flatten(0, 1)
        way_labels = merge_support_labels(masks, ways)
        s_labels = way_labels.amax(1) if shared else way_labels.flatten(0, 1)  # ways disjoint; 255 > any way
        upto = self.stage
        q_feats, s_feats = self.features(query, upto), self.features(s_imgs, upto)
        if self.stage == 1:
            return self._stage1(q_feats[1], s_feats[1], batch, size, shared, s_labels)
        if self.stage == 2:
            areas = batch.get("support_areas")
            if areas is None or batch.get("query_areas") is None:
                raise ValueError("popnet stage 2 needs query_areas / support_areas: set data.hierarchy")
            areas = areas[:, 0] if shared else areas.flatten(0, 1)
            s_area = torch.where(s_labels == IGNORE, IGNORE, torch.where(s_labels > 0, areas, 0))
            K = self.p["areas"]
            keys = torch.arange(1, K + 1, device=query.device).expand(B, K)
            q_target = torch.where(batch["query_mask"] > 0, batch["query_areas"], batch["query_mask"])
            return self._dml(2, q_feats[2], s_feats[2], s_area, K, keys, q_target, size, B)
        return self._dml(3, q_feats[3], s_feats[3], s_labels, ways, batch["classes"], batch.get("query_mask"),
                         size, B)

    def _dml(self, stage, h_q, h_s, s_labels, K, keys, q_target, size, B) -> dict:
        protos, present = self.prototypes(stage, h_s, s_labels, K, keys, B)
        m = cosine_logits(h_q, protos, scale=1.0)
        beta = self.beta()
        head = self.heads[str(stage)]
        want_agm = self.p["head"] == "agm" or (self.training and beta > 0)
        # NCM without a graph while its loss weight is 0 (beta = 1): its parameters then take no part in the step
        # (their gradients were None either way), which DDP's unused-parameter search needs to see
        agm, ncm = head(h_q, m, present, agm=want_agm, ncm_grad=not self.training or beta < 1)
        up = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=True)  # noqa: E731
        out_logits = up(agm if self.p["head"] == "agm" else ncm)
        losses = {}
        if self.training:
            if q_target is None:
                raise ValueError("popnet: training needs batch['query_mask']")
            check_labels("popnet", "query labels", q_target, top=K)  # clamp below would hide them until the loss
            absent = F.pad(~present, (1, 0))  # (B, K + 1): a class the support lacks is background (R5)
            target = torch.where(absent.gather(1, q_target.clamp(max=K).flatten(1)).view_as(q_target)
                                 & (q_target != IGNORE), 0, q_target)
            weight = torch.ones(K + 1, device=target.device)
            weight[0] = self.p["bg_weight"]
            if beta > 0:
                losses["agm"] = beta * F.cross_entropy(up(agm), target, weight=weight, ignore_index=IGNORE)
            if beta < 1:
                losses["ncm"] = (1 - beta) * F.cross_entropy(out_logits if self.p["head"] != "agm" else up(ncm),
                                                             target, weight=weight, ignore_index=IGNORE)
            self.steps[stage] += 1
        return {"logits": out_logits, "losses": losses}

    def _stage1(self, g_q, g_s, batch, size, shared, s_labels) -> dict:
        logits = F.interpolate(self.fg_classifier(g_q), size=size, mode="bilinear", align_corners=True)
        losses = {}
        if self.training:
            q, s = self._stage1_labels(batch, shared, s_labels)
            fg = lambda y: torch.where(y == IGNORE, IGNORE, (y > 0).long())  # noqa: E731
            s_logits = F.interpolate(self.fg_classifier(g_s), size=s.shape[-2:], mode="bilinear", align_corners=True)
            losses["fg"] = 0.5 * (F.cross_entropy(logits, fg(q), ignore_index=IGNORE) +
                                  F.cross_entropy(s_logits, fg(s), ignore_index=IGNORE))
            self.steps[1] += 1
        return {"logits": logits, "losses": losses}

    def _stage1_labels(self, batch: dict, shared: bool, s_labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The query (B, H, W) and support (B or B S, H, W) labels whose non-zero pixels are the person (R3).
        Without person or area maps, the support's are its ways merged (``s_labels``): a shared k-way support's
        first slot marks one way's class only."""
        for kind in ("areas",) if self.p["fg_excludes_novel"] else ("human", "areas"):
            if batch.get(f"query_{kind}") is not None:
                s = batch[f"support_{kind}"]
                return batch[f"query_{kind}"], s[:, 0] if shared else s.flatten(0, 1)
        return batch["query_mask"], s_labels

    @staticmethod
    def _check(batch: dict, B: int, S: int, ways: int) -> None:
        supports, masks, query = batch["support_imgs"], batch["support_masks"], batch["query_img"]
        if supports.dim() != 5 or supports.shape[:2] != (B, S) or masks.shape[-2:] != supports.shape[-2:]:
            raise ValueError(f"popnet: support images {tuple(supports.shape)} and masks {tuple(masks.shape)} do not "
                             f"match (expected (B, S, 3, H, W) and (B, S, H, W))")
        if query.shape[0] != B or batch["classes"].shape[0] != B:
            raise ValueError(f"popnet: query {tuple(query.shape)} / classes {tuple(batch['classes'].shape)} do not "
                             f"match the batch size {B} of the supports")
        if S == 0 or S % ways:
            raise ValueError(f"popnet: {S} support slots is not a positive multiple of {ways} ways (slots are "
                             f"way-major)")
        check_labels("popnet", "support_masks", masks)  # binary per way slot
