"""Pure-PyTorch references, written the way the public FSS repositories write them (see
../shared/notes/reference-conventions.md). Tests hold every fsskern op to these; benchmarks
time fsskern against them. They materialise what the fused kernels avoid, on purpose."""
from . import attention, clustering
from .prior_mask import prior_mask, prior_mask_single_shot
from .masked_average_pool import (class_prototypes_popnet, masked_average_pool, panet_masked_average_pool,
                                  weighted_gap)


__all__ = ["weighted_gap", "panet_masked_average_pool", "class_prototypes_popnet", "masked_average_pool",
           "prior_mask", "prior_mask_single_shot", "clustering", "attention"]
