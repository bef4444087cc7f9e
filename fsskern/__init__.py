"""fsskern: fused C++/CUDA kernels for few-shot semantic segmentation, as PyTorch ops.

Importing the package loads the compiled library (registering ``torch.ops.fsskern.*``) and
the Python-side fake kernels and autograd formulas. The public API is :mod:`fsskern.ops`;
pure-PyTorch references written the way the public FSS repositories write them are in
:mod:`fsskern.reference`; drop-in functions named as the public FSS codebases name theirs in
:mod:`fsskern.compat`.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C  # noqa: F401  (registers torch.ops.fsskern.*)
from . import nn, ops, reference  # noqa: E402
from . import compat  # noqa: E402  (after ops and nn, which it builds on: fsskern.compat.panet.patch(model))
from ._build import build_info  # noqa: E402

__all__ = ["ops", "nn", "reference", "compat", "build_info"]
__version__ = "0.1.0"
