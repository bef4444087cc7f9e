"""Drop-in clustering and prototype cross-attention for UMTFSS code.

Mirrors SSSKYue/UMTFSS (commit bc92b523):
- ``util/cluster.py`` ``Cluster(n_iter)``: LSH (32 bits, biased planes) + Hamming k-means,
  ``forward(x, k)`` -> (cluster index per point, counts);
- ``model/proto_transformer.py`` ``SuppSelfAttention.cluster_group_lsh_kmeans(s_x,
  supp_valid_mask, supp_mask, use_valid=False)`` -> (prototypes, padding mask);
- ``model/proto_transformer.py`` ``ProtoCrossAtt(dim, num_heads=1, qkv_bias=False, qk_scale=None,
  attn_drop=0., proj_drop=0.)`` with parameters ``q_fc``, ``k_fc``, ``v_fc``, ``proj``: its
  state_dict loads unchanged into :class:`ProtoCrossAtt` here.

What is not reproduced, and why:
- Randomness. UMTFSS draws new hash planes per image and part from torch's global generator and the
  k-means start from ``np.random`` (its test script seeds both; the CPU kernel's random codes for empty
  clusters are not seedable), and its CPU and CUDA k-means differ (tie bits, empty clusters, 9 vs 10
  updates). Here every draw comes from one ``torch.Generator`` (one set of planes per call) and the k-means
  follows fsskern's definition (nearest centroid, lowest index on ties; per-bit majority, a tie
  keeps the bit; an empty cluster keeps its code; ``n_iter`` updates then a final assignment) on
  every device. Same algorithm and distribution, not the same random numbers.
- Dropout (training only) draws fsskern's counter-based mask, not ``nn.Dropout``'s; same keep
  rate and scaling.
- An image whose prototypes are all padding: UMTFSS adds -10000 to every score (a plain softmax
  up to fp32 rounding of the shifted scores); here the exact plain softmax.
- ``Cluster(down_dim > 0)`` (PCA through ``torch.eig``, removed from PyTorch) is refused.
Re-implemented on fsskern ops; no code copied.
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn import all_invalid_as_valid

HASH_BITS = 32
CLUSTER_EPS = 0.001  # added to the cluster counts in UMTFSS's means


def planes_dtype(x: torch.Tensor) -> torch.dtype:
    """lsh_hash reads float16 / bfloat16 points with float32 planes (a half model's tokens used to fail)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Cluster(nn.Module):
    """UMTFSS ``Cluster``: ``forward(x (L, E), k)`` -> cluster of each point (L,) int64 and the
    count of each cluster (k,) int32. Planes, then the k starting points, are drawn from
    ``generator`` (torch's default one when None)."""

    def __init__(self, n_iter: int, down_dim: int = -1, generator: Optional[torch.Generator] = None):
        super().__init__()
        if down_dim > 0:
            raise ValueError("Cluster: down_dim > 0 (UMTFSS's PCA on torch.eig, removed from PyTorch) is not offered")
        self.n_iter = n_iter
        self.bits = HASH_BITS
        self.hash_bias = True
        self.generator = generator

    def lsh_kmeans(self, x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        planes = ops.lsh_planes(self.bits, x.shape[-1], generator=self.generator, dtype=planes_dtype(x),
                                device=x.device)
        if not self.hash_bias:
            planes[:, -1] = 0
        codes = ops.lsh_hash(x.detach(), planes).unsqueeze(0)
        assign, _, counts = ops.hamming_kmeans(codes, k, iters=self.n_iter, generator=self.generator)
        return assign[0], counts[0].int()

    def forward(self, x: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.lsh_kmeans(x, k)


def cluster_group_lsh_kmeans(s_x: torch.Tensor, supp_valid_mask: torch.Tensor, supp_mask: torch.Tensor,
                             use_valid: bool = False, *, clusters_fg: int = 20, clusters_bg: int = 50,
                             n_iter: int = 10,
                             generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """UMTFSS's support prototypes: per image, foreground and background tokens clustered apart.

    Args:
        s_x: (B, L, C) support tokens of all shots (UMTFSS's ``s_bs``).
        supp_valid_mask: (B, L) bool, True on padding tokens (UMTFSS's name; ``== 255`` of the
            padding mask); unless ``use_valid`` those tokens are dropped.
        supp_mask: (B, L) bool, True on foreground tokens.
        clusters_fg, clusters_bg, n_iter: UMTFSS's 20, 50, 10 (``SuppSelfAttention`` attributes;
            :func:`patch` binds a layer's own).
        generator: draws, in this order, the foreground planes, the background planes, the
            foreground starting points, the background starting points (all images at once).

    Returns:
        prototypes (B, clusters_fg + clusters_bg, C) and the padding mask (B, same) float, 1 on
        padding rows, laid out as UMTFSS lays them: per part (foreground, then background) the
        cluster means ``sum / (count + 0.001)`` if the part has more tokens than clusters, its
        raw tokens otherwise (a one-cluster part: the plain mean), packed one after another,
        then zero rows. As in UMTFSS, empty clusters are zero rows NOT marked as padding, and the
        prototypes are not normalised (UMTFSS's forward normalises them afterwards).
        Differentiable w.r.t. s_x (the clustering itself is not).
    """
    B, L, C = s_x.shape
    pad = supp_valid_mask.bool()
    fg = supp_mask.bool()
    parts = [(fg, clusters_fg), (~fg, clusters_bg)]
    if not use_valid:
        parts = [(part & ~pad, k) for part, k in parts]
    points = s_x.detach()
    planes = [ops.lsh_planes(HASH_BITS, C, generator=generator, dtype=planes_dtype(s_x), device=s_x.device)
              for _ in parts]
    inits = [ops.draw_init(part, k, generator) if k > 1 else None for part, k in parts]
    means = []  # per part: the (B, k, C) cluster means, None for a one-cluster part
    for (part, k), plane, init in zip(parts, planes, inits):
        if k == 1:
            means.append(None)
            continue
        assign, _, _ = ops.hamming_kmeans(ops.lsh_hash(points, plane), k, iters=n_iter, valid=part, init=init)
        means.append(ops.cluster_means(s_x, assign, k, eps=CLUSTER_EPS)[0])
    total = clusters_fg + clusters_bg
    prototypes, padding = [], []
    for b in range(B):
        rows = torch.cat([_part_rows(s_x[b], part[b], k, None if m is None else m[b])
                          for (part, k), m in zip(parts, means)], 0)
        n = rows.shape[0]
        prototypes.append(F.pad(rows, (0, 0, 0, total - n)))
        mask = s_x.new_ones(total)
        mask[:n] = 0
        padding.append(mask)
    return torch.stack(prototypes), torch.stack(padding)


def _part_rows(tokens: torch.Tensor, part: torch.Tensor, k: int, means: Optional[torch.Tensor]) -> torch.Tensor:
    """One image's rows for one part, as UMTFSS picks them: the plain mean for one cluster, the
    raw tokens when there are no more than k, the cluster means otherwise."""
    if k == 1:
        return tokens[part].mean(0, keepdim=True)
    if int(part.sum()) <= k:
        return tokens[part]
    return means


class ProtoCrossAtt(nn.Module):
    """UMTFSS's prototype cross-attention layer on the fused attention op.

    Same constructor, parameter names (``q_fc``, ``k_fc``, ``v_fc`` with ``qkv_bias``; ``proj``
    without bias) and ``forward(q (B, N, C), k (B, P, C), v (B, P, C), supp_valid_mask=None)``
    -> (B, N, C): ``proj(softmax(scale q k^T + mask) v)``, scale ``qk_scale or head_dim ** -0.5``;
    ``supp_valid_mask`` (B, P) holds 1 (or True) on padding prototypes, which get no weight
    (UMTFSS adds -10000). ``attn_drop`` / ``proj_drop`` are ``nn.Dropout`` modules as in UMTFSS;
    the attention dropout reads ``attn_drop.p`` and is applied inside the fused op. The
    (B, heads, N, P) score matrix is never stored.
    """

    def __init__(self, dim: int, num_heads: int = 1, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.q_fc = nn.Linear(dim, dim, bias=qkv_bias)
        self.k_fc = nn.Linear(dim, dim, bias=qkv_bias)
        self.v_fc = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        return x.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                supp_valid_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = q.shape
        key_valid = None
        if supp_valid_mask is not None:
            padding = supp_valid_mask.detach()
            if not bool(((padding == 0) | (padding == 1)).all()):
                raise ValueError("ProtoCrossAtt: supp_valid_mask must hold only 0 and 1 (1 = padding prototype)")
            key_valid = all_invalid_as_valid(padding == 0)
        dropout_p = self.attn_drop.p if self.training else 0.0
        out = ops.prototype_attention(self._heads(self.q_fc(q)), self._heads(self.k_fc(k)), self._heads(self.v_fc(v)),
                                      key_valid=key_valid, scale=self.scale, dropout_p=dropout_p)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


def patch(proto_transformer: nn.Module, generator: Optional[torch.Generator] = None) -> None:
    """Swap fsskern in for a UMTFSS ``ProtoTransformer`` instance: each ``cross_layers[i]`` becomes
    a :class:`ProtoCrossAtt` holding the old layer's own linear layers (the same parameter tensors, so an
    optimizer built before the patch still trains them), and ``self_supp_cluster``'s
    ``cluster_group_lsh_kmeans`` this module's, bound to that layer's cluster counts."""
    for i, old in enumerate(proto_transformer.cross_layers):
        new = ProtoCrossAtt(old.q_fc.in_features, old.num_heads, qkv_bias=old.q_fc.bias is not None,
                            qk_scale=old.scale, attn_drop=old.attn_drop.p, proj_drop=old.proj_drop.p)
        for name in ("q_fc", "k_fc", "v_fc", "proj"):
            setattr(new, name, getattr(old, name))
        proto_transformer.cross_layers[i] = new.train(old.training)
    layer = proto_transformer.self_supp_cluster
    layer.cluster_group_lsh_kmeans = functools.partial(cluster_group_lsh_kmeans, clusters_fg=layer.clusters_fg,
                                                       clusters_bg=layer.clusters_bg, n_iter=layer.n_iter,
                                                       generator=generator)
