"""Dataset sources (one file each), found by name through ``build_source(cfg.data, split)``."""
from . import coco, folder, fss1000, parsing, pascal, pseudo  # noqa: F401  (register the sources)
from .base import IGNORE, Source, build_source, list_sources, register_source

__all__ = ["Source", "build_source", "list_sources", "register_source", "IGNORE"]
