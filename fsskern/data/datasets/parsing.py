"""One-shot human parsing (POPNet, AAAI 2021; public code Charleshhy/One-shot-Human-Parsing).

Two layouts (``data.params.layout``):
- ``popnet``: ``trainval_images/<id>.jpg``, ``trainval_classes/<id>.png`` (raw ATR/LIP/CIHP ids) and
  ``list/meta_{train,test}_id.txt``; the first ``pool_boundary + 1`` lines of a list form the query
  pool, the rest the support pool (code: train 7500, test 200; paper ATR-OS: first 8000 / rest).
  Splits "train" and "val" read meta_train, "test" meta_test.
- ``folder``: a labelled folder in LIP format (``images/`` + ``labels/``, e.g. VITON parsing maps) or
  any class list (e.g. CCP with ``data.merge`` groups); one pool serves queries and supports.

``data.params.preset`` (atr | lip | cihp) gives the raw class names, the public code's merge
(``mirror_cls``: left/right merged, rare classes to background) and the built-in folds
(``fold_protocol``: ``paper`` = ATR-OS paper folds {pants, legs, shoes} / {hair, face, hat};
``code`` = the public code's folds). ``data.merge`` and ``data.folds`` override them.
``data.hierarchy`` ({area: [fine class names]}) gives the stage-2 area of each fine class
(``to_areas``; unlisted foreground classes are an error, so the hierarchy stays complete)."""
from typing import Dict, Sequence, Tuple

import numpy as np

from ..io import DataError, apply_lut, check_same_size, read_image, read_label, read_lines
from .base import IGNORE, register_source
from .folder import FolderSource

ATR = ["background", "hat", "hair", "sunglasses", "upper-clothes", "skirt", "pants", "dress", "belt", "left-shoe",
       "right-shoe", "face", "left-leg", "right-leg", "left-arm", "right-arm", "bag", "scarf"]
LIP = ["background", "hat", "hair", "glove", "sunglasses", "upper-clothes", "dress", "coat", "socks", "pants",
       "jumpsuits", "scarf", "skirt", "face", "left-arm", "right-arm", "left-leg", "right-leg", "left-shoe",
       "right-shoe"]
PRESETS = {
    "atr": {"names": ATR, "merge": {"shoes": [9, 10], "legs": [12, 13], "arms": [14, 15], "background": [3, 8, 17]},
            "folds": {"paper": [[6, 9, 12], [1, 2, 11]], "code": [[5, 6, 7], [1, 4, 16]]},
            "test_class_order": [1, 7, 5, 16, 9, 4, 2, 6, 11, 12, 14]},
    "lip": {"names": LIP, "merge": {"arms": [14, 15], "legs": [16, 17], "shoes": [18, 19], "background": [3, 4, 8, 11]},
            "folds": {"code": [[6, 9, 12], [5, 7, 10]]},
            "test_class_order": [10, 6, 12, 1, 2, 5, 7, 9, 13, 14, 16, 18]},
    "cihp": {"names": LIP[:10] + ["torso-skin"] + LIP[11:],
             "merge": {"arms": [14, 15], "legs": [16, 17], "shoes": [18, 19], "background": [3, 4, 8, 11]},
             "folds": {"code": [[6, 9, 12], [1, 5, 7]]},
             "test_class_order": [12, 6, 1, 2, 5, 7, 9, 10, 13, 14, 16, 18]},
}
PARSING_PARAMS = ["layout", "preset", "fold_protocol", "pool_boundary"]


@register_source("parsing")
class ParsingSource(FolderSource):
    def __init__(self, cfg_data, split: str):
        params = dict(cfg_data.params or {})
        self.preset = PRESETS.get(params.get("preset")) if params.get("preset") else None
        if params.get("preset") and self.preset is None:
            raise DataError(f"unknown parsing preset {params['preset']!r}; expected one of {sorted(PRESETS)}")
        self.layout = params.get("layout", "folder")
        if self.layout not in ("folder", "popnet"):
            raise DataError(f"unknown parsing layout {self.layout!r}; expected folder or popnet")
        if self.preset and cfg_data.merge is None:
            cfg_data = _with(cfg_data, merge=self.preset["merge"])
        if self.preset and cfg_data.folds is None:
            protocol = params.get("fold_protocol", "code")
            if protocol not in self.preset["folds"]:
                raise DataError(f"preset {params['preset']!r} has no {protocol!r} folds; "
                                f"available: {sorted(self.preset['folds'])} (or set data.folds)")
            cfg_data = _with(cfg_data, folds=self.preset["folds"][protocol])
        super().__init__(cfg_data, split, extra_params=PARSING_PARAMS)
        self.test_holds_every_image &= self.layout == "folder"  # POPNet's layout lists its test images apart
        self.query_pool = list(range(len(self.samples)))
        self.support_pool = self.query_pool
        if self.layout == "popnet":
            boundary = int(params.get("pool_boundary", 7500 if split != "test" else 200))
            self.query_pool = list(range(min(boundary + 1, len(self.samples))))
            self.support_pool = list(range(boundary + 1, len(self.samples)))
            if not self.support_pool:
                raise DataError(f"pool_boundary {boundary} leaves no support pool in a {len(self.samples)}-image list")
        self.test_class_order = [c for c in (self.preset or {}).get("test_class_order", self.foreground_classes())
                                 if c in self.foreground_classes()]
        self.area_names, self.area_lut = self.build_hierarchy(cfg_data.hierarchy)

    def class_table(self, cfg_data) -> Dict[int, str]:
        if cfg_data.classes:
            return super().class_table(cfg_data)
        if not self.preset:
            raise DataError("parsing dataset needs data.classes or data.params.preset")
        return dict(enumerate(self.preset["names"]))

    def list_samples(self, image_dir, label_dir, image_ext, list_file):
        if self.layout == "folder":
            return super().list_samples(image_dir, label_dir, image_ext, list_file)
        name = "meta_test_id.txt" if self.split == "test" else "meta_train_id.txt"
        # once each, in first-seen order, as the folder layout: a repeated id would be two samples, and an episode
        # could take the query's own image as its support
        ids = list(dict.fromkeys(read_lines(self.root / "list" / name, "image list")))
        images, labels = self.root / "trainval_images", self.root / "trainval_classes"
        return [(i, str(images / (i + ".jpg")), str(labels / (i + ".png"))) for i in ids]

    def build_hierarchy(self, hierarchy):
        if not hierarchy:
            return None, None
        by_name = {n: c for c, n in enumerate(self.class_names) if n}
        lut = np.full(IGNORE + 1, -1, dtype=np.int64)
        lut[0], lut[IGNORE] = 0, IGNORE
        for a, (area, members) in enumerate(hierarchy.items(), start=1):
            for m in members:
                if m not in by_name:
                    raise DataError(f"data.hierarchy area {area!r} names unknown class {m!r}; "
                                    f"classes: {sorted(by_name)}")
                if lut[by_name[m]] > 0:  # every class sits in exactly one area (docs/data.md)
                    raise DataError(f"data.hierarchy puts class {m!r} in two areas: "
                                    f"{list(hierarchy)[lut[by_name[m]] - 1]!r} and {area!r}")
                lut[by_name[m]] = a
        missing = [self.class_names[c] for c in self.foreground_classes() if lut[c] < 0]
        if missing:
            raise DataError(f"data.hierarchy leaves classes {missing} without an area")
        return ["background"] + list(hierarchy), lut

    def train_episodes(self, pools: Dict[int, Sequence[int]], key: dict, shots: int = 1, ways: int = 1):
        from ..episodes import parsing_train_episodes
        return parsing_train_episodes(self, pools, key, shots, ways)

    def load_with_person(self, i: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image, label, person): person is 1 wherever the raw label names any part (raw id != 0), before
        the class merge, so the classes merged into background (ATR's sunglasses, belt and scarf) stay part
        of the person, as the code's stage-1 mask (notes A2); IGNORE where the label is ignore."""
        _, image_path, label_path = self.samples[i]
        image = read_image(image_path)
        raw = read_label(label_path, self.label_channel)
        label = apply_lut(raw, self.lut, label_path)
        check_same_size(image, label, image_path, label_path)
        return image, label, np.where(label == IGNORE, IGNORE, raw != 0).astype(np.int64)

    def to_areas(self, label: np.ndarray) -> np.ndarray:
        """Fine class ids -> area ids (0 bg, 1..n in ``data.hierarchy`` order, 255 kept)."""
        if self.area_lut is None:
            raise DataError("this parsing dataset has no data.hierarchy")
        return self.area_lut[label]


def _with(cfg_data, **changes):
    import copy
    cfg = copy.copy(cfg_data)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg
