"""The ``Source`` contract (docs/architecture.md): the samples of one split, loaded as
(uint8 RGB image, int64 label in dataset class ids with 255 = ignore). A source knows nothing of
episodes. Subclasses fill ``samples`` (id, image path, label path) and ``lut`` (raw label value ->
class id, 255 ignore, -1 invalid) and say which classes are novel in a fold."""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..io import DataError, apply_lut, check_same_size, read_image, read_label

IGNORE = 255
_SOURCES: Dict[str, Callable] = {}


def register_source(name: str):
    def wrap(cls):
        if name in _SOURCES:
            raise ValueError(f"dataset source {name!r} is registered twice")
        cls.name = name
        _SOURCES[name] = cls
        return cls
    return wrap


def list_sources() -> List[str]:
    return sorted(_SOURCES)


def build_source(cfg_data, split: str) -> "Source":
    """The source named ``cfg_data.dataset`` for ``split`` ("train" | "val" | "test")."""
    if cfg_data.dataset not in _SOURCES:
        raise DataError(f"unknown dataset {cfg_data.dataset!r}; registered: {', '.join(list_sources())}")
    if split not in ("train", "val", "test"):
        raise DataError(f"unknown split {split!r}; expected train, val or test")
    return _SOURCES[cfg_data.dataset](cfg_data, split)


def check_params(cfg_data, allowed: Sequence[str]) -> dict:
    """The dataset-specific ``data.params``; unknown keys are refused (a typo must not be ignored)."""
    params = dict(getattr(cfg_data, "params", None) or {})
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise DataError(f"unknown data.params for dataset {cfg_data.dataset!r}: {unknown}; allowed: {sorted(allowed)}")
    return params


def make_lut(valid: Sequence[int], ignore: Sequence[int] = (IGNORE,), remap: Optional[Dict[int, int]] = None,
             size: int = 256) -> np.ndarray:
    """Raw value -> class id table: ``valid`` values map to themselves (or through ``remap``),
    ``ignore`` values to 255, everything else to -1 (an error at load time)."""
    lut = np.full(size, -1, dtype=np.int64)
    for v in valid:
        lut[v] = v
    for v, to in (remap or {}).items():
        lut[v] = to
    for v in ignore:
        lut[v] = IGNORE
    return lut


Box = Tuple[int, int, int, int]  # (y0, x0, y1, x1), ends exclusive


def component_boxes(region: np.ndarray) -> List[Box]:
    """The tight boxes of the 8-connected components of a boolean map."""
    _, _, stats, _ = cv2.connectedComponentsWithStats(region.astype(np.uint8), connectivity=8)
    return [(int(y), int(x), int(y + h), int(x + w)) for x, y, w, h, _ in stats[1:]]  # row 0: the background


def box_mask(shape: Tuple[int, int], boxes: Sequence[Box]) -> np.ndarray:
    """A support mask from box annotations: 1 inside the union of ``boxes``, 0 elsewhere (an annotator
    who draws boxes marks no void, so nothing is 255)."""
    mask = np.zeros(shape, dtype=np.int64)
    for y0, x0, y1, x1 in boxes:
        mask[y0:y1, x0:x1] = 1
    return mask


class Source:
    name: str = ""
    ignore_index: int = IGNORE
    num_folds: int = 1

    def __init__(self, split: str):
        self.split = split
        self.class_names: List[str] = []
        self.samples: List[Tuple[str, str, str]] = []   # (sample id, image path, label path)
        self.lut: np.ndarray = np.zeros(0, dtype=np.int64)
        # classes that are scene background, not objects (e.g. MSRC-v2's grass, sky): BAM's base learner
        # reads them as its background class 0, which a fully labelled dataset would otherwise never show it
        self.stuff: List[int] = []
        # whether the test split is every image of the set (a folder without a split): its training images then
        # are the test images, and only the bam policy (no image holding a novel class) keeps them apart
        self.test_holds_every_image = False

    def __len__(self) -> int:
        return len(self.samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split={self.split!r}, samples={len(self)}, classes={len(self.class_names)})"

    def sample_id(self, i: int) -> str:
        return self.samples[i][0]

    def load(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """(image uint8 (H, W, 3) RGB, label int64 (H, W)); DataError names the file on any defect."""
        _, image_path, label_path = self.samples[i]
        image = read_image(image_path)
        label = self.load_label(i)
        check_same_size(image, label, image_path, label_path)
        return image, label

    def load_label(self, i: int) -> np.ndarray:
        """The label alone (what the class index reads), mapped to class ids."""
        label_path = self.samples[i][2]
        return apply_lut(read_label(label_path), self.lut, label_path)

    def class_pixels(self, label: np.ndarray) -> Dict[int, int]:
        """{class id: pixels} of the foreground classes in ``label`` (0 and 255 left out). Sources
        with a region filter (pseudo labels) override this."""
        counts = np.bincount(label.ravel(), minlength=self.ignore_index + 1)
        return {c: int(n) for c, n in enumerate(counts) if n and c not in (0, self.ignore_index)}

    def instance_boxes(self, i: int, label: np.ndarray, cls: int) -> List[Box]:
        """The tight boxes of the instances of ``cls`` in sample ``i`` (``label`` is its label): the
        connected components of its pixels (CRCNet notes 5.6, the rule for sets without instance
        annotations); a source that has them overrides this (PASCAL's ``SegmentationObject``)."""
        return component_boxes(label == cls)

    def box_rule(self) -> str:
        """Where ``instance_boxes`` finds instances (recorded with box-support results)."""
        return "connected components"

    def fold_classes(self, fold: int) -> Tuple[List[int], List[int]]:
        """(base, novel) foreground class ids of ``fold``."""
        self.check_fold(fold)
        novel = sorted(self.novel_classes(fold))
        return [c for c in self.foreground_classes() if c not in novel], novel

    def base_learner_classes(self, base: Sequence[int]) -> List[int]:
        """The base-learner label space (BAM): the fold's base classes that are objects, not stuff."""
        return [c for c in base if c not in self.stuff]

    def foreground_classes(self) -> List[int]:
        return [c for c, n in enumerate(self.class_names) if c > 0 and n is not None]

    def novel_classes(self, fold: int) -> List[int]:
        raise NotImplementedError

    def check_fold(self, fold: int) -> None:
        if not 0 <= fold < self.num_folds:
            raise DataError(f"fold {fold} out of range for dataset {self.name!r} (folds 0..{self.num_folds - 1})")

    def train_episodes(self, pools: Dict[int, Sequence[int]], key: dict, shots: int = 1, ways: int = 1):
        """Training episodes over ``pools`` (class -> image indices): PFENet-style class episodes;
        a source that draws its episodes another way (parsing, pseudo tasks) overrides this."""
        from ..episodes import TrainEpisodes
        return TrainEpisodes(pools, key, shots, ways)

    def describe(self) -> dict:
        """What a result file records about the data."""
        return {"dataset": self.name, "split": self.split, "samples": len(self), "classes": len(self.class_names)}
