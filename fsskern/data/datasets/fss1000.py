"""FSS-1000 (HSNet layout): ``<root>/<class>/<n>.jpg`` with a ``<n>.png`` mask, foreground where the
mask is >= ``mask_threshold`` (128; the authors' example pairs store 0/1 and need 1).

Class split files (HSNet ``data/splits/fss/{trn,val,test}.txt``, 520/240/240 names; the test list is
the official one): ``<root>/splits/`` by default, ``data.params.split_dir`` overrides it (a relative path
that does not exist from the working directory is read under the root, as the list paths are).
``python/prepare_data.py fss1000`` writes trn/val files around the official test list.
Class ids follow HSNet's global order (each split's names sorted, as HSNet sorts them; trn 0-519, val +520,
test +760) shifted by one, so 0 stays
background, and by one more from id 255 on, which stays ignore (``class_names[255]`` is None).
Splits: "train" reads trn classes, "val" the val classes, "test" the test classes. There is one
fold: base = trn classes, novel = the test classes for "test", the val classes otherwise (model
selection on the val classes never touches the test classes)."""
from pathlib import Path
from typing import List

import numpy as np

from ..io import DataError, read_label, read_lines, under_root
from .base import Source, check_params, register_source

SPLIT_FILES = {"train": "trn", "val": "val", "test": "test"}


@register_source("fss1000")
class FSS1000Source(Source):
    num_folds = 1

    def __init__(self, cfg_data, split: str):
        super().__init__(split)
        params = check_params(cfg_data, ["split_dir", "mask_threshold", "image_ext"])
        root = Path(cfg_data.root)
        split_dir = under_root(params["split_dir"], root) if "split_dir" in params else root / "splits"
        self.threshold = int(params.get("mask_threshold", 128))
        ext = params.get("image_ext", ".jpg")
        # sorted within each split, as HSNet's FSS-1000 dataset sorts its categories before numbering them
        groups = {s: sorted(read_lines(split_dir / f"{s}.txt", f"FSS-1000 {s} class split"))
                  for s in ("trn", "val", "test")}
        names = groups["trn"] + groups["val"] + groups["test"]
        self.class_names = ["background"] + names[:254] + ([None] + names[254:] if len(names) > 254 else [])
        ids = [k + 1 if k + 1 < 255 else k + 2 for k in range(len(names))]
        first = {"trn": 0, "val": len(groups["trn"]), "test": len(groups["trn"]) + len(groups["val"])}
        self.split_classes = {s: ids[first[s]:first[s] + len(g)] for s, g in groups.items()}
        self.sample_class = []
        for c in self.split_classes[SPLIT_FILES[split]]:
            folder = root / self.class_names[c]
            images = sorted(folder.glob("*" + ext), key=lambda p: (len(p.stem), p.stem))
            if not images:
                raise DataError(f"class {self.class_names[c]!r} has no image in {folder}")
            for p in images:
                self.samples.append((f"{self.class_names[c]}/{p.stem}", str(p), str(p.with_suffix(".png"))))
                self.sample_class.append(c)

    def load_label(self, i: int) -> np.ndarray:
        raw = read_label(self.samples[i][2])
        return np.where(raw >= self.threshold, self.sample_class[i], 0).astype(np.int64)

    def describe(self) -> dict:
        return {**super().describe(), "mask_threshold": self.threshold}

    def novel_classes(self, fold: int) -> List[int]:
        return self.split_classes["test" if self.split == "test" else "val"]

    def fold_classes(self, fold: int):
        self.check_fold(fold)
        return self.split_classes["trn"], self.novel_classes(fold)
