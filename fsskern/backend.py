"""The ops switch: ``get_backend("fused")`` is :mod:`fsskern.ops`; ``get_backend("reference")`` has the same
function names and signatures over the pure-PyTorch references (:mod:`fsskern.reference`), so one model runs,
is tested and is benchmarked both ways (config key ``ops``).

Where the two differ by design (documented on the fused ops): ``prototype_attention`` with every key of an
image invalid (fused: 0, reference: UMTFSS's -10000 on every score, so a plain softmax over them); dropout masks
(fused: Philox keyed by ``seed``, reference: ``F.dropout`` from torch's generator, ``seed`` ignored), so parity
needs ``dropout_p=0`` (eval); fp16/bf16 inputs to ``prior_mask`` / ``max_cosine`` give float32 fused and the
inputs' dtype in the reference (PFENet's loop), which the models cast back; NaN/Inf in what the fused ops never
visit (invalid keys, background support pixels, unassigned tokens: README, "Defined results"); and ``max_cosine``'s
argmax on an exact tie at 0 between a masked-out pixel and a foreground one (fused: the masked-out pixel, index -1,
no gradient; reference: the first pixel, which may be foreground): equal values, and two valid subgradients.
"""
from types import SimpleNamespace
from typing import Optional, Sequence, Tuple

import torch

from . import ops
from .ops.clustering import draw_init, lsh_planes
from .reference import attention as ref_attention
from .reference import clustering as ref_clustering
from .reference import composed
from .reference.masked_average_pool import masked_average_pool as ref_masked_average_pool
from .reference.prior_mask import prior_mask as ref_prior_mask

FUNCTIONS = ("masked_average_pool", "class_prototypes", "prior_mask", "max_cosine", "support_prototypes",
             "prototype_attention", "local_conditional_attention", "lsh_planes", "lsh_hash", "draw_init",
             "hamming_kmeans", "cluster_means")


def masked_average_pool(features: torch.Tensor, masks: torch.Tensor, *, resize: str = "mask",
                        eps: Optional[float] = None) -> torch.Tensor:
    return ref_masked_average_pool(features, masks, resize, eps)


def prior_mask(query: torch.Tensor, support: torch.Tensor, support_masks: torch.Tensor, *, eps: float = 1e-7,
               normalize: bool = True, reduce: Optional[str] = "mean",
               out_size: Optional[Sequence[int]] = None, search_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``search_dtype`` is accepted for the fused signature: the reference's dense search is exact already."""
    return ref_prior_mask(query, support, support_masks, eps, normalize, reduce, out_size)


def prototype_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        key_valid: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                        dropout_p: float = 0.0, seed: Optional[int] = None) -> torch.Tensor:
    """``seed`` is accepted for the fused signature and ignored: dropout here is ``F.dropout``."""
    return ref_attention.prototype_attention(q, k, v, key_valid, scale, dropout_p)


def local_conditional_attention(query: torch.Tensor, support: torch.Tensor, support_mask: torch.Tensor, *,
                                value: Optional[torch.Tensor] = None, mode: str = "exclude") -> torch.Tensor:
    return ref_attention.local_conditional_attention(query, support, support_mask, value, mode)


def lsh_hash(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    x = ref_clustering.autocast_rounded(x)
    wide = torch.promote_types(x.dtype, planes.dtype)  # (autocast would round the planes too)
    with torch.autocast(x.device.type, enabled=False):
        return ref_clustering.lsh_hash(x.to(wide), planes.to(wide))


def hamming_kmeans(codes: torch.Tensor, k: int, *, iters: int = 10, valid: Optional[torch.Tensor] = None,
                   init: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if valid is None:
        valid = torch.ones_like(codes, dtype=torch.bool)
    if init is None:
        init = draw_init(valid, k, generator)
    return ref_clustering.hamming_kmeans(codes, k, iters, valid, init)


def cluster_means(features: torch.Tensor, assign: torch.Tensor, k: int, *,
                  eps: float = 1e-3) -> Tuple[torch.Tensor, torch.Tensor]:
    if features.dim() >= 4:  # channel-first maps (B, S, C, h, w) / (B, S, C, M) -> tokens, shot by shot
        features = features.flatten(3).transpose(2, 3).flatten(1, 2)
    return ref_clustering.cluster_means(features, assign, k, eps)


_REFERENCE = dict(masked_average_pool=masked_average_pool, class_prototypes=composed.class_prototypes,
                  prior_mask=prior_mask, max_cosine=composed.max_cosine,
                  support_prototypes=composed.support_prototypes, prototype_attention=prototype_attention,
                  local_conditional_attention=local_conditional_attention, lsh_planes=lsh_planes,
                  lsh_hash=lsh_hash, draw_init=draw_init, hamming_kmeans=hamming_kmeans, cluster_means=cluster_means)
_BACKENDS = {"fused": SimpleNamespace(name="fused", **{f: getattr(ops, f) for f in FUNCTIONS}),
             "reference": SimpleNamespace(name="reference", **_REFERENCE)}


def get_backend(name: str) -> SimpleNamespace:
    """``"fused"`` or ``"reference"``: a namespace with the functions in ``FUNCTIONS`` (and ``name``)."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown ops backend {name!r}; choose 'fused' or 'reference'")
    return _BACKENDS[name]
