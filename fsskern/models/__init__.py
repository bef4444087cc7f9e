"""Few-shot segmentation models on the fsskern ops: one file per method, shared blocks in
``blocks.py``. Importing this package registers every model with :func:`create_model`."""
from .registry import create_model, list_models, register_model
from . import baseline  # noqa: F401,E402  (registers the model)
from . import rilfs  # noqa: F401
from . import dpcl  # noqa: F401
from . import popnet  # noqa: F401
from . import crcnet  # noqa: F401
from . import umtfss  # noqa: F401

__all__ = ["create_model", "list_models", "register_model"]
