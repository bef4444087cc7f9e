"""UMTFSS pseudo-label folder (unsupervised meta-training): ``images/<id>.<ext>``, ``pseudo/<id>.png``
(palette PNG at the original resolution, value = cluster 0..N-1, no ignore value) and ``index.json``
from the pseudo-label builder: ``{"version": 1, "num_clusters": N, "samples": [ids]}`` (optionally
``"image_ext"``). Cluster n is class n + 1 here, so that 0 stays "background" (= every other cluster
of the episode's image).

Region filters (UMTFSS code, ``util/pseudo_dataset.py``): a cluster counts in an image only if it
covers >= ``min_pixels`` (the class index's 2048) and leaves >= 1 % of the image's rows *and* >= 1 %
of its columns free (``span`` = 0.99: a region spanning 99 % of the height or width is "stuff").
There are no folds: every cluster is a base class."""
import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from ..io import DataError
from .base import Source, check_params, make_lut, register_source


@register_source("pseudo")
class PseudoSource(Source):
    num_folds = 1

    def __init__(self, cfg_data, split: str):
        super().__init__(split)
        params = check_params(cfg_data, ["span", "index", "label_dir"])
        root = Path(cfg_data.root)
        index_path = root / params.get("index", "index.json")
        if not index_path.is_file():
            raise DataError(f"missing pseudo-label index file: {index_path}")
        try:
            index = json.loads(index_path.read_text())
            n, ids = int(index["num_clusters"]), list(index["samples"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"bad pseudo-label index {index_path}: {e!r}") from None
        if not ids:
            raise DataError(f"empty pseudo-label index: {index_path}")
        self.span = float(params.get("span", 0.99))
        ext = index.get("image_ext", ".jpg")
        label_dir = root / params.get("label_dir", "pseudo")
        self.samples = [(i, str(root / "images" / (i + ext)), str(label_dir / (i + ".png"))) for i in ids]
        self.class_names = ["background"] + [f"cluster{c}" for c in range(n)]
        self.lut = make_lut([], ignore=(), remap={c: c + 1 for c in range(n)})

    def class_pixels(self, label: np.ndarray) -> Dict[int, int]:
        h, w = label.shape
        out = {}
        for c, n in super().class_pixels(label).items():
            m = label == c
            free_rows = h - int(m.any(axis=1).sum())
            free_cols = w - int(m.any(axis=0).sum())
            if free_rows >= (1 - self.span) * h and free_cols >= (1 - self.span) * w:
                out[c] = n
        return out

    def novel_classes(self, fold: int) -> List[int]:
        return []

    def describe(self) -> dict:
        return {**super().describe(), "span_filter": self.span}
