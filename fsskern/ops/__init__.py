"""The public fsskern ops. Each wraps a ``torch.ops.fsskern`` op (schema and kernels in
``csrc/ops``) and registers its fake kernel and autograd formula."""
from .attention import local_conditional_attention, prototype_attention
from .clustering import cluster_means, draw_init, hamming_kmeans, lsh_hash, lsh_planes, support_prototypes
from .masked_average_pool import class_prototypes, masked_average_pool
from .prior_mask import max_cosine, prior_mask

__all__ = ["masked_average_pool", "class_prototypes", "prior_mask", "max_cosine", "lsh_planes", "lsh_hash",
           "draw_init", "hamming_kmeans", "cluster_means", "support_prototypes",
           "prototype_attention", "local_conditional_attention"]
