"""UMTFSS (Li, Shi et al., "Label-Efficient Few-Shot Semantic Segmentation with Unsupervised Meta-Training",
AAAI 2024): the few-shot segmenter of stage B (meta-training on pseudo tasks) and stage C (fine-tuning on few
labels; the same model, other data). Stage A (the pseudo tasks) is the ``pseudo`` dataset's builder.

The spec with every equation is ``../shared/notes/methods/umtfss.md`` (section numbers below are its own); the
layout follows the public code (SSSKYue/UMTFSS ``model/fss_network.py``, ``model/proto_transformer.py``), read,
not copied. ``docs/methods/umtfss.md`` lists the resolutions below with their sources.

Forward for B episodes of K shots (3.2), d = ``reduce_dim``:

1. frozen backbone (BN frozen) at ``output_stride`` (paper 8: ResNet-50 layer2/3/4 at 60 x 60 for 473; dilated
   as torchvision's ``replace_stride_with_dilation``, the first block of a dilated layer keeping the previous
   dilation, as the code's ``model/backbone_utils.py``) on the query and the B * K supports; layer2 is resized
   to layer3's grid when they differ (the other models' rule).
2. adapters: Dropout2d(0.5)(ReLU(Conv1x1(concat(layer2, layer3)))) -> d, separate for query and support.
3. MAP per shot: ``backend.masked_average_pool`` (Weighted_GAP: mask bilinear to the grid, eps 5e-4); the
   query side reads the mean over shots, each support shot its own vector (code).
4. prior: ``backend.prior_mask`` on layer4 (PFENet: masked support, cosine eps 1e-7, per-shot min-max, mean
   over shots), in float32.
5. merges: query ReLU(Conv1x1([X_q; g; prior])) (2d + 1 -> d), support ReLU(Conv1x1([X_s; g_k])) (2d -> d).
6. tokens + a DETR sine positional encoding (d / 2 features per axis, normalised, temperature 1e4, 2 pi) of
   the full grid, added to queries and keys of self-attention only.
7. support stack, ``layers`` x [X = LN(X + Drop(SA(X + pos, X))); X = LN(FFN(X))] per shot; padded support
   tokens (support_masks == 255) are not attended to (the code zeroes them in its deformable attention).
8. prototypes: ``backend.support_prototypes`` on the post-attention support tokens of all shots (LSH 32 bits
   + Hamming k-means, 10 updates, K_fg + K_bg cluster means, L2-normalised, padded tokens excluded through
   ``valid``, empty clusters and padding rows masked).
9. query stack, ``layers`` x [SA block; FFN; X = LN(X + ProtoCrossAttention(X, P)); FFN] (code order), the
   cross-attention ``fsskern.nn.PrototypeCrossAttention`` (8 heads, scale (d / 8) ** -0.5, dropout 0.1) on
   the backend's ``prototype_attention``.
10. head Conv1x1(Dropout2d(0.1)(ReLU(Conv3x3(O_q)))) -> 2, upsampled bilinear (align_corners) to the input.
11. loss (4.1, code): weighted Dice on the sigmoid of both channels, targets bg = (y == 0), fg = (y == 1);
    ignore pixels are 0 in both targets and their predictions still count in sum(p^2) (code).

Resolutions (source: P paper, C public code, N the notes' recommendation, R ours):
- K_fg / K_bg: 50 / 100 (``profile: paper``, P Table 4) or 20 / 50 (``profile: code``, C). [notes 7 #1]
- LSH bits 32, Lloyd updates 10 (C GPU path). [#2]  Prototype = mean with +0.001, not Eq. 5's sum (C). [#3]
- Prototypes from the post-self-attention tokens X^s (P Eq. 5); the code's support self-attention is a no-op
  (its output is discarded): ``profile: code`` skips it (``support_self_attention: false``). [#4, #6]
- Self-attention: dense multi-head attention through ``F.scaled_dot_product_attention`` (P Eq. 1-2), not the
  code's deformable attention (not offered); bias-free q/k/v/out projections as in the cross-attention (R);
  dropout 0.1 on the attention weights and after the block (C); on the CPU in training at large grids,
  query-row chunks under checkpointing (``dense_attention``), because the CPU's SDPA keeps every N x N map with
  dropout, their dropout masks drawn 16 bits per weight (keep probability 1 - p rounded to 2 ** -15) (R). [#5]
- Layer order: query [SA, FFN, Cross, FFN] x 2 post-LN, support [SA, FFN] x 2, prototypes built once (C). [#7]
- Attention scale (d / heads) ** -0.5 per head (C). [#8]
- Prototypes L2-normalised; padding rows and empty clusters masked (C + fsskern); an image with no valid
  prototype attends to all of them by a plain softmax, as the code's -10000 on every score gives (C; until
  session 40 it got zeros). [#9]
- fg/bg token split: mask bilinear >= 0.5 (fsskern ``support_prototypes``; C: nearest); padded tokens
  dropped from both sets (C). [#10]
- Clustering randomness: seeded ``torch.Generator``; training draws its seed from torch's global RNG (saved
  in checkpoints, so runs resume exactly); evaluation seeds each episode with ``eval_seed + batch["index"]``
  and clusters episode by episode, so a result does not depend on the batch size (N; C is unseeded). [#11]
- Loss: the code's Dice loss (P states none). [#12]
- Optimisers: SGD (momentum, weight decay and poly from ``train``) for every non-Transformer layer at
  ``sgd_lr_mult`` x train.lr (C x15; P "base 1e-2"); AdamW at ``transformer_lr`` 1e-4, weight decay 1e-2,
  none on biases / LayerNorm (P: 1e-2; C exempts only parameters named bias, so its LayerNorm weights decay;
  the notes' #14 exempts LayerNorm too, kept). [#13, #14] As the code: AdamW's LR constant (the group's
  ``schedule: constant``), SGD warmed up (``train.warmup_iters``) then poly.
- Head Dropout2d(0.1) (C). FFN 3d, bias-free, residual inside (C). Linear layers Xavier-uniform (C 4.4).
- Positional encoding of the full grid for both stacks (R): the batch has no padding-only mask, and the
  query mask's 255 (void labels) must not reach the model at test time; C uses the padding masks. For the same
  reason the query self-attention attends to every token, padded ones included (C masks the padded query
  keys); the support side excludes its padded tokens from the prototypes (``valid``), as C does.
- ``init``: a whole-model checkpoint to start from, so stage C runs on its own from one stage-B run shared by
  folds and label ratios (the code loads its SSL checkpoint the same way) (C). ``output_stride`` 16 for the CPU
  recipes (R: the dilated depthwise convs and 961-token attention at stride 8 cost ~10 s a step on 2 cores).
- Support without foreground: the code's fallback, per shot (centre 2 x 2 tokens as foreground for the clustering);
  zero MAP vector and zero prior, as the code computes them. Not an error.

Batch (``docs/architecture.md``): query_img (B, 3, H, W), support_imgs (B, K, 3, H, W), support_masks
(B, K, H, W) int64 (1 fg, 0 bg, 255 ignore/padding), query_mask (B, H, W) in training, index (B,) (the
clustering seed at evaluation; 0 when absent). Any K. Output: {"logits": (B, 2, H, W) (bg, fg), "losses":
{"dice"} in training}.
"""
import math
import sys
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..backbones import create_backbone, freeze, read_model_state, require_backbone
from ..nn import PrototypeCrossAttention, all_invalid_as_valid
from .blocks import check_one_way_batch
from .params import check_ranges, parse_params
from .registry import register_model

# name: (default, type). None defaults come from the profile. The model refuses any other key.
PARAMS = {
    "profile": ("paper", str),                  # paper | code (table above)
    "k_fg": (None, int),                        # foreground prototypes (paper 50, code 20)
    "k_bg": (None, int),                        # background prototypes (paper 100, code 50)
    "support_self_attention": (None, bool),     # paper true; code false (its support SA is a no-op)
    "reduce_dim": (256, int),
    "heads": (8, int),
    "layers": (2, int),
    "dropout": (0.1, float),                    # Transformer dropout (attention weights, block outputs, FFN)
    "ffn_mult": (3, int),
    "bits": (32, int),
    "iters": (10, int),
    "sgd_lr_mult": (15.0, float),               # the code's scale_lr on every SGD group
    "transformer_lr": (1e-4, float),
    "transformer_weight_decay": (1e-2, float),
    "eval_seed": (0, int),                      # clustering seed at evaluation: eval_seed + episode index
    "output_stride": (8, int),                  # backbone stride (paper 8: 60 x 60 at 473; CPU recipes 16)
    "init": (None, str),                        # a checkpoint to start from (stage C from a stage-B run)
}
PROFILES = {"paper": dict(k_fg=50, k_bg=100, support_self_attention=True),
            "code": dict(k_fg=20, k_bg=50, support_self_attention=False)}


def _parse_params(given: Dict) -> Dict:
    p = parse_params("umtfss", given, {k: d for k, (d, _) in PARAMS.items()})
    if p["profile"] not in PROFILES:
        raise ValueError(f"umtfss: model.params.profile must be one of {', '.join(PROFILES)}, got {p['profile']!r}")
    for key, value in PROFILES[p["profile"]].items():
        if p[key] is None:
            p[key] = value
    for key, (_, kind) in PARAMS.items():
        value = p[key]
        if value is None and key == "init":
            continue
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            p[key] = value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ValueError(f"umtfss: model.params.{key} must be {kind.__name__}, got {value!r}")
    for key in ("k_fg", "k_bg", "reduce_dim", "heads", "layers", "ffn_mult", "iters"):
        if p[key] < 1:
            raise ValueError(f"umtfss: model.params.{key} must be >= 1, got {p[key]}")
    if p["reduce_dim"] % p["heads"] or p["reduce_dim"] % 4:
        raise ValueError(f"umtfss: reduce_dim ({p['reduce_dim']}) must be divisible by heads ({p['heads']}) and "
                         f"by 4 (the sine encoding's sin/cos pairs per axis)")
    check_ranges("umtfss", p, positive=("sgd_lr_mult", "transformer_lr"), non_negative=("transformer_weight_decay",))
    if not 0 <= p["dropout"] < 1:
        raise ValueError(f"umtfss: model.params.dropout must be in [0, 1), got {p['dropout']}")
    if not 1 <= p["bits"] <= 64:
        raise ValueError(f"umtfss: model.params.bits must be in 1..64, got {p['bits']}")
    return p


def sine_encoding(h: int, w: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """DETR / mmdet ``SinePositionalEncoding(dim // 2, normalize=True)`` of an unpadded h x w grid: (h * w, dim),
    y features first; positions 1..h (1..w) scaled to (0, 2 pi], temperature 1e4, sin/cos interleaved."""
    feats = dim // 2
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device) / (h + 1e-6) * 2 * math.pi
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device) / (w + 1e-6) * 2 * math.pi
    dim_t = 10000 ** (2 * (torch.arange(feats, dtype=torch.float32, device=device) // 2) / feats)

    def encode(pos):  # (n,) -> (n, feats): sin on even, cos on odd features, interleaved
        t = pos[:, None] / dim_t
        return torch.stack([t[:, 0::2].sin(), t[:, 1::2].cos()], 2).flatten(1)
    pos_y = encode(y)[:, None].expand(h, w, feats)
    pos_x = encode(x)[None].expand(h, w, feats)
    return torch.cat([pos_y, pos_x], -1).reshape(h * w, dim).to(dtype)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """UMTFSS's weighted Dice loss (notes 4.1): per image and channel 1 - 2 sum(p t) / max(sum p^2 + sum t^2,
    1e-8), p = sigmoid of that channel, t_bg = (y == 0), t_fg = (y == 1); summed over the 2 channels, mean over
    the batch."""
    p = logits.float().sigmoid().flatten(2)
    t = torch.stack([target == 0, target == 1], 1).flatten(2).to(p.dtype)
    ratio = 2 * (p * t).sum(-1) / ((p * p).sum(-1) + (t * t).sum(-1)).clamp(min=1e-8)
    return (1 - ratio).sum(1).mean()


class _ReLUDropout(torch.autograd.Function):
    """dropout(relu(x)) keeping only its output for backward: where it is positive the gradient passes scaled by
    1 / (1 - p), elsewhere it is 0 (ReLU cut it or dropout did). Dropout's own draw and values, so the same RNG
    stream and results as ``nn.ReLU`` then ``nn.Dropout``; the output is the next Linear's saved input anyway,
    where the two modules keep the ReLU output and the dropout mask as well (a float32 mask on the CPU): 44 MB
    per FFN at 473 x 473, batch 2."""

    @staticmethod
    def forward(ctx, x, p):
        out = F.dropout(x.relu(), p, training=True)
        ctx.save_for_backward(out)
        ctx.p = p
        return out

    @staticmethod
    def backward(ctx, grad):
        out, = ctx.saved_tensors
        # dropout's own backward scale: the CPU's kept value in the input's dtype, CUDA's float32 1 / (1 - p)
        scale = 1 / (1 - ctx.p) if grad.is_cuda else torch.ones((), dtype=grad.dtype).div_(1 - ctx.p)
        return torch.where(out > 0, grad * scale, 0), None


class ReLUDropout(nn.Module):
    """nn.ReLU then nn.Dropout(p) in one autograd node that keeps only its output (see ``_ReLUDropout``)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not (self.training and self.p > 0):
            return x.relu()
        return _ReLUDropout.apply(x, self.p) if torch.is_grad_enabled() else F.dropout(x.relu(), self.p, True)


class FFN(nn.Module):
    """The code's FFN: x + Drop(Linear(Drop(ReLU(Linear(x))))), bias-free, hidden ``mult`` x dim."""

    def __init__(self, dim: int, mult: int, dropout: float):
        super().__init__()
        # the Identity keeps the second Linear at index 3, where checkpoints of the ReLU, Dropout layout name it
        self.layers = nn.Sequential(nn.Linear(dim, mult * dim, bias=False), ReLUDropout(dropout), nn.Identity(),
                                    nn.Linear(mult * dim, dim, bias=False), nn.Dropout(dropout))

    def forward(self, x):
        return x + self.layers(x)


def dropout_keep_mask(shape, p: float, device=None) -> Tuple[torch.Tensor, float]:
    """A Bernoulli keep mask (bool, ``shape``) for dropout ``p`` from 16 random bits per element, and the keep
    probability it draws with (1 - p rounded to a multiple of 2 ** -15).

    ``random_()`` fills int32 with 31 random bits; each draw is read as two int16 halves, the low one uniform
    over [-2 ** 15, 2 ** 15) and the high one over [0, 2 ** 15), compared with a threshold each. Half a draw per
    element and one byte of mask: ``bernoulli_`` on float32 (the CPU's dropout) took a third of the paper-size
    training step on 2 cores, and its float32 mask four bytes."""
    drop = min(round(p * 2 ** 15), 2 ** 15 - 1)                  # dropped values of the 15-bit half
    n = math.prod(shape)
    halves = torch.empty((n + 1) // 2, dtype=torch.int32, device=device).random_().view(torch.int16).view(-1, 2)
    low, high = 2 * drop - 2 ** 15, drop                         # the 16-bit half spans twice the 15-bit one
    thresholds = torch.tensor([low, high] if sys.byteorder == "little" else [high, low], dtype=torch.int16,
                              device=device)
    return (halves >= thresholds).view(-1)[:n].view(shape), 1 - drop / 2 ** 15


def _attention_rows(q, k, v, mask, dropout_p):
    """softmax(q k^T / sqrt(dh), masked) with dropout, times v: SDPA's maths, the dropout mask from
    ``dropout_keep_mask``. Every row needs one valid key (``SelfAttention`` makes sure)."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.float().softmax(-1).to(v.dtype)  # float32 softmax under autocast, as SDPA's math path
    keep, keep_p = dropout_keep_mask(weights.shape, dropout_p, weights.device)
    return torch.matmul(torch.where(keep, weights, 0), v / keep_p)  # the 1 / keep scaling on the small v


def dense_attention(q, k, v, mask=None, dropout_p=0.0, budget=2 ** 24):
    """``F.scaled_dot_product_attention`` that stays lean and fast when it trains with dropout on the CPU;
    ``mask`` masks keys only ((B, 1, 1, N), broadcast over the query rows).

    PyTorch's CPU kernels run attention dropout only on the math path, which keeps the (B, heads, N, N)
    weights and a float32 dropout mask for backward: at 473 x 473 (3,600 tokens) that is 10.6 of the 11.6 GB of
    a 1-shot training step, and the 5-shot step does not fit in 24 GB. There, query rows go through in chunks
    under activation checkpointing, as many rows as keep one (B, heads, rows, N) map within ``budget`` elements
    (64 MB in fp32: 291 rows at 1-shot, 58 at 5-shot, where B counts every shot), and backward recomputes each
    chunk with the same dropout mask (checkpoint restores the RNG state). The chunks compute SDPA's maths
    themselves (``_attention_rows``) with a bool mask of 16-bit draws (``dropout_keep_mask``): the math path's
    float32 ``bernoulli_``, its mask pass and its safe softmax's checks took half the attention's time. Elsewhere
    (no dropout, no autograd, or CUDA, whose fused kernels do dropout) it is the plain call."""
    rows = max(1, budget // (q.shape[:-2].numel() * k.shape[-2]))
    lean = dropout_p > 0 and q.device.type == "cpu" and torch.is_grad_enabled() and q.shape[-2] > rows
    if not lean:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    parts = [checkpoint(_attention_rows, part, k, v, mask, dropout_p, use_reentrant=False)
             for part in q.split(rows, dim=-2)]
    return torch.cat(parts, -2)


class SelfAttention(nn.Module):
    """Multi-head self-attention (Eq. 1) on ``dense_attention`` (SDPA): queries and keys from x + pos,
    values from x; ``key_valid`` (B, N) bool excludes keys (a row without any valid key attends to all)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim, bias=False) for _ in range(4))

    def forward(self, x, pos, key_valid=None):
        B, N, dim = x.shape
        split = lambda t: t.view(B, N, self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        mask = None
        if key_valid is not None:
            mask = (key_valid | ~key_valid.any(1, keepdim=True))[:, None, None]
        out = dense_attention(split(self.to_q(x + pos)), split(self.to_k(x + pos)), split(self.to_v(x)),
                              mask, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(out.transpose(1, 2).reshape(B, N, dim))


class CrossAttention(PrototypeCrossAttention):
    """``fsskern.nn.PrototypeCrossAttention`` (same parameters and maths) with the attention function passed in:
    the layer binds the fused op, and ``ops=reference`` must run the reference one."""

    def forward(self, x, prototypes, valid, attention):
        q = self._split_heads(self.to_q(x))
        k, v = self._split_heads(self.to_k(prototypes)), self._split_heads(self.to_v(prototypes))
        # under autocast the projections come in bf16 / fp16, which the op reads as they are
        out = attention(q, k, v, key_valid=all_invalid_as_valid(valid),
                        dropout_p=self.dropout if self.training else 0.0)
        return self.out_dropout(self.to_out(out.transpose(1, 2).reshape(x.shape)))


class SupportLayer(nn.Module):
    """X = LN(X + Drop(SA(X + pos, X))); X = LN(FFN(X))."""

    def __init__(self, dim, heads, mult, dropout):
        super().__init__()
        self.attn, self.drop = SelfAttention(dim, heads, dropout), nn.Dropout(dropout)
        self.ffn = FFN(dim, mult, dropout)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, pos, key_valid=None):
        x = self.norm1(x + self.drop(self.attn(x, pos, key_valid)))
        return self.norm2(self.ffn(x))


class QueryLayer(SupportLayer):
    """The support layer, then X = LN(X + ProtoCross(X, P)); X = LN(FFN(X)) (the code's order)."""

    def __init__(self, dim, heads, mult, dropout):
        super().__init__(dim, heads, mult, dropout)
        self.cross, self.ffn2 = CrossAttention(dim, heads, dropout), FFN(dim, mult, dropout)
        self.norm3, self.norm4 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, pos, prototypes, valid, attention):
        x = super().forward(x, pos)
        x = self.norm3(x + self.cross(x, prototypes, valid, attention))
        return self.norm4(self.ffn2(x))


def _conv_relu(cin, cout, dropout=0.0):
    layers = [nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Dropout2d(dropout)) if dropout else nn.Sequential(*layers)


@register_model("umtfss")
class UMTFSS(nn.Module):
    """UMTFSS few-shot segmenter; see the module docstring for the forward order, resolutions and the batch."""

    def __init__(self, cfg, backend):
        super().__init__()
        p = self.p = _parse_params(dict(cfg.params or {}))
        self.backend = backend
        if not cfg.freeze_backbone:
            raise ValueError("umtfss: the backbone is frozen, BatchNorms included (paper); "
                             "set model.freeze_backbone: true")
        kw = {"dilation": "torchvision"} if cfg.backbone.startswith("resnet") else {}  # the code's backbone
        require_backbone(cfg.backbone, "umtfss")
        self.backbone = freeze(create_backbone(cfg.backbone, weights=cfg.weights, frozen_bn=True,
                                               output_stride=p["output_stride"], **kw))
        ch, d = self.backbone.channels, p["reduce_dim"]
        self.down_query = _conv_relu(ch["layer2"] + ch["layer3"], d, dropout=0.5)
        self.down_supp = _conv_relu(ch["layer2"] + ch["layer3"], d, dropout=0.5)
        self.query_merge = _conv_relu(2 * d + 1, d)
        self.supp_merge = _conv_relu(2 * d, d)
        args = (d, p["heads"], p["ffn_mult"], p["dropout"])
        # one module holds every Transformer parameter: the AdamW group (the code splits on "transformer")
        self.transformer = nn.ModuleDict({
            "query": nn.ModuleList(QueryLayer(*args) for _ in range(p["layers"])),
            "support": nn.ModuleList(SupportLayer(*args) for _ in range(p["layers"]))
            if p["support_self_attention"] else nn.ModuleList()})
        self.head = nn.Sequential(nn.Conv2d(d, d, 3, padding=1, bias=False), nn.ReLU(inplace=True), nn.Dropout2d(0.1),
                                  nn.Conv2d(d, 2, 1))
        for m in self.transformer.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
        if p["init"]:
            self.load_init(p["init"])

    def load_init(self, path):
        """Every weight from a checkpoint of this model (an fsskern checkpoint or a bare state dict): stage C
        starts from a stage-B run this way (for one run, the trainer's phase chaining does the same)."""
        state = read_model_state(path, "umtfss: model.params.init", " (the stage-B run's last.pt; null trains stage C "
                                 "from scratch)")
        try:
            self.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"umtfss: {path} does not fit this model (backbone, reduce_dim, layers, profile?): "
                             f"{str(e).splitlines()[0]}") from None

    def param_groups(self, train_cfg=None):
        """SGD for the convolutions at ``sgd_lr_mult`` x train.lr (warm-up + poly); AdamW for the Transformer at a
        constant ``transformer_lr``, ``transformer_weight_decay`` on weight matrices and none on LayerNorm (the
        layers have no biases)."""
        p = self.p
        rest = [q for n, q in self.named_parameters() if q.requires_grad and not n.startswith("transformer.")]
        tr = [q for q in self.transformer.parameters() if q.requires_grad]
        adamw = dict(optimizer="adamw", lr=p["transformer_lr"], schedule="constant")  # the code's constant LR
        return [{"params": rest, "optimizer": "sgd", "lr_mult": p["sgd_lr_mult"]},
                {"params": [q for q in tr if q.dim() > 1], "weight_decay": p["transformer_weight_decay"], **adamw},
                {"params": [q for q in tr if q.dim() <= 1], "weight_decay": 0.0, **adamw}]

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, batch: Dict) -> Dict:
        query, supports, smasks = check_one_way_batch(
            "umtfss", batch, self.training, same_size="the positional encoding and the prior read one grid")
        B, K = supports.shape[:2]
        fg = (smasks == 1).to(query.dtype)
        valid = smasks != 255
        q, s = self._features(query), self._features(supports.flatten(0, 1))
        xq, xs = self.down_query(q["mid"]), self.down_supp(s["mid"])
        d, (h, w) = xq.shape[1], xq.shape[-2:]
        g_k = self.backend.masked_average_pool(xs, fg.flatten(0, 1)[:, None], resize="mask")[:, 0]  # (B * K, d)
        g = g_k.view(B, K, d).mean(1)
        # bf16 / fp16 features under autocast are read as they are; the prior comes back in float32
        prior = self.backend.prior_mask(q["layer4"], s["layer4"].view(B, K, *s["layer4"].shape[1:]),
                                        fg, reduce="mean", out_size=(h, w)).to(xq.dtype)
        del q, s  # layer4 is the prior's alone: not held under the Transformer (ResNet-50 473: 118 MB, 5-shot 354)
        xq = self.query_merge(torch.cat([xq, g[..., None, None].expand(-1, -1, h, w), prior], 1))
        xs = self.supp_merge(torch.cat([xs, g_k[..., None, None].expand(-1, -1, h, w)], 1))

        pos = sine_encoding(h, w, d, xq.device, xq.dtype)
        tq, ts = xq.flatten(2).transpose(1, 2), xs.flatten(2).transpose(1, 2)
        if len(self.transformer["support"]):
            token_valid = F.interpolate(valid.float(), size=(h, w), mode="nearest").flatten(0, 1).flatten(1) > 0
            for layer in self.transformer["support"]:
                ts = layer(ts, pos, token_valid)
        # bf16 / fp16 under autocast: the hash and the cluster means read them as they are
        maps = ts.transpose(1, 2).reshape(B, K, d, h, w)
        protos, proto_valid = self.prototypes(maps, fg.float(), valid, batch)
        for layer in self.transformer["query"]:
            tq = layer(tq, pos, protos, proto_valid, self.backend.prototype_attention)
        logits = self.head(tq.transpose(1, 2).reshape(B, d, h, w))
        out = {"logits": F.interpolate(logits, query.shape[-2:], mode="bilinear", align_corners=True)}
        if self.training:
            out["losses"] = {"dice": dice_loss(out["logits"], batch["query_mask"])}
        return out

    def prototypes(self, maps, fg, valid, batch):
        """``backend.support_prototypes`` on maps (B, K, d, h, w): one call seeded from torch's RNG in training;
        at evaluation one call per episode, seeded with eval_seed + its index (results repeat)."""
        args = dict(k_fg=self.p["k_fg"], k_bg=self.p["k_bg"], bits=self.p["bits"], iters=self.p["iters"])
        if self.training:
            g = torch.Generator().manual_seed(int(torch.randint(2 ** 62, (1,))))
            return self.backend.support_prototypes(maps, fg, valid=valid, generator=g, **args)
        index = batch.get("index")
        parts = []
        for b in range(maps.shape[0]):
            g = torch.Generator().manual_seed(self.p["eval_seed"] + (int(index[b]) if index is not None else 0))
            parts.append(self.backend.support_prototypes(maps[b:b + 1], fg[b:b + 1], valid=valid[b:b + 1],
                                                         generator=g, **args))
        return torch.cat([x for x, _ in parts]), torch.cat([v for _, v in parts])

    def _features(self, images):
        """Frozen backbone without autograd: {"mid": concat(layer2, layer3), "layer4"}; layer2 is resized to
        layer3's grid when they differ."""
        with torch.no_grad():
            f = self.backbone(images, layers=("layer2", "layer3", "layer4"))
            l2 = f["layer2"]
            if l2.shape[-2:] != f["layer3"].shape[-2:]:
                l2 = F.interpolate(l2, f["layer3"].shape[-2:], mode="bilinear", align_corners=True)
            return {"mid": torch.cat([l2, f["layer3"]], 1), "layer4": f["layer4"]}
