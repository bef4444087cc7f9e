"""Drop-in functions named, called and numbered as the public FSS codebases name, call and number them.

Replacing an import (or assigning one attribute) moves an existing codebase onto the fsskern ops:

- :mod:`.pfenet`  PFENet / BAM / CyCTR / UMTFSS / HDMNet / MSANet: ``Weighted_GAP``, the prior block
  (``corr_query_mask``, PFENet mean or BAM K-shot weights).
- :mod:`.panet`   PANet / DPCL-style ``FewShotSeg`` (not PPNet's part model): ``getFeatures``, ``getPrototype``,
  ``calDist``, ``alignLoss`` (``patch(model)`` swaps all four).
- :mod:`.popnet`  POPNet ``sp_ave_features`` (``class_average_features``), EOPNet
  ``get_static_prototypes``.
- :mod:`.umtfss`  UMTFSS ``Cluster``, ``cluster_group_lsh_kmeans``, ``ProtoCrossAtt`` (state_dicts
  load unchanged; ``patch(proto_transformer)``).

HSNet and its family (DCAMA, Matcher, PATNet, ifsl) have no entry: their hot step is the dense
4-D correlation (every query pixel against every support pixel, kept whole for the 4-D
convolutions), which no fsskern op computes; fsskern's fused prior reduces over the support
pixels instead. See docs/compat.md.

Each module names the repository, file and commit it mirrors and what it does not reproduce. ``import fsskern``
imports this package too. The ``patch`` functions are one-way: ``panet.patch`` sets instance attributes (``del
model.getFeatures`` and the other three restores the class's methods); ``umtfss.patch`` replaces the cross-attention
modules, keeping their parameter tensors.
"""
from . import panet, pfenet, popnet, umtfss

__all__ = ["pfenet", "panet", "popnet", "umtfss"]
