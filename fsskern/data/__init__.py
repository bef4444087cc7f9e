"""Data: files -> dataset source -> episode manifest -> transforms -> episode batch
(docs/architecture.md; docs/data.md)."""
from .datasets import Source, build_source, list_sources
from .io import DataError

__all__ = ["DataError", "Source", "build_source", "list_sources"]
