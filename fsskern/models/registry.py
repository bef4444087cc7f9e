"""A timm-style registry joining the engine and the models: the engine asks for a model by the
name in its config, and never imports a model module by name."""
from typing import Callable, Dict

_MODELS: Dict[str, Callable] = {}


def register_model(name: str):
    """Class decorator: ``@register_model("panet")`` makes ``create_model`` find the class."""
    def wrap(cls):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice ({_MODELS[name].__module__} and {cls.__module__})")
        _MODELS[name] = cls
        return cls
    return wrap


def list_models():
    return sorted(_MODELS)


def create_model(cfg, ops: str = "fused"):
    """Build ``cfg.name`` with its config and the ops backend selected by ``ops``."""
    from ..backend import get_backend
    if cfg.name not in _MODELS:
        raise KeyError(f"unknown model {cfg.name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[cfg.name](cfg, get_backend(ops))
