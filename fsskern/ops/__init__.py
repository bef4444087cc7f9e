"""The public fsskern ops. Each wraps a ``torch.ops.fsskern`` op (schema and kernels in
``csrc/ops``) and registers its fake kernel and autograd formula."""
from .masked_average_pool import class_prototypes, masked_average_pool
from .prior_mask import max_cosine, prior_mask

__all__ = ["masked_average_pool", "class_prototypes", "prior_mask", "max_cosine"]
