"""PASCAL-5i (Shaban et al.; PFENet/BAM/HSNet layout): ``JPEGImages/<id>.jpg`` and
``SegmentationClassAug/<id>.png`` (8-bit palette PNGs read as indices: 0 bg, 1..20, 255 boundary).

Lists: ``ImageSets/Segmentation/train_aug.txt`` for "train" and "val" (the held-out model-selection
images are base-class images of the training list) and ``ImageSets/Segmentation/val.txt`` for
"test"; ``data.train_list`` / ``data.val_list`` override them. A list line may be an image id, a
PFENet pair (``JPEGImages/x.jpg SegmentationClassAug/x.png``) or an HSNet split entry
(``2007_000033__01``, 1-indexed class; the (image, class) pairs are kept in ``listed_pairs``).
Fold k novel classes: 5k+1..5k+5.

Box supports (``eval.support_annotation=box``) take each instance's tight box from VOC's instance maps,
``SegmentationObject/<id>.png`` (0 background, 1..n instances, 255 boundary), where the image has one:
the 2,913 VOC 2012 segmentation images, so every image of the test list. Other images (SBD's) fall
back to the connected components of the class's pixels, and so does every image of a root without the
folder (a PFENet-style copy with ``SegmentationClassAug`` only), and class pixels no instance covers;
results record which (``box_rule``).
A box spans the instance's labelled pixels: VOC's 255 band around each object lies outside it."""
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..io import DataError, check_same_size, read_label, read_lines, under_root
from .base import IGNORE, Box, Source, check_params, component_boxes, make_lut, register_source

VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor"]


def parse_list(lines: List[str], root: Path, image_dir: str, label_dir: str, image_ext: str, label_ext: str,
               list_path) -> Tuple[List[Tuple[str, str, str]], Optional[List[Tuple[str, int]]]]:
    """Samples (id, image, label) in first-seen order, and the (id, class) pairs of an HSNet split file."""
    samples, seen, pairs = [], set(), []
    for ln in lines:
        parts = ln.split()
        if len(parts) == 2:  # PFENet pair list
            sid = Path(parts[0]).stem
            entry = (sid, str(root / parts[0]), str(root / parts[1]))
        elif len(parts) == 1:
            sid, sep, cls = parts[0].partition("__")
            if sep:
                if not cls.isdigit():
                    raise DataError(f"bad HSNet split entry {ln!r} in {list_path}")
                pairs.append((sid, int(cls)))
            entry = (sid, str(root / image_dir / (sid + image_ext)), str(root / label_dir / (sid + label_ext)))
        else:
            raise DataError(f"bad list line {ln!r} in {list_path}: expected an id, 'image label' or 'id__class'")
        if sid not in seen:
            seen.add(sid)
            samples.append(entry)
    if pairs and len(pairs) != len(lines):
        raise DataError(f"{list_path} mixes HSNet 'id__class' entries with other lines")
    return samples, (pairs or None)


@register_source("pascal")
class PascalSource(Source):
    num_folds = 4

    def __init__(self, cfg_data, split: str):
        super().__init__(split)
        params = check_params(cfg_data, ["image_dir", "label_dir"])
        root = self.root = Path(cfg_data.root)
        default = "ImageSets/Segmentation/" + ("val.txt" if split == "test" else "train_aug.txt")
        chosen = cfg_data.val_list if split == "test" else cfg_data.train_list
        list_path = under_root(chosen, root) if chosen else root / default
        self.list_path = str(list_path)
        self.samples, pairs = parse_list(read_lines(list_path, "image list"), root,
                                         params.get("image_dir", "JPEGImages"),
                                         params.get("label_dir", "SegmentationClassAug"), ".jpg", ".png", list_path)
        index = {s[0]: i for i, s in enumerate(self.samples)}
        self.listed_pairs = [(index[sid], c) for sid, c in pairs] if pairs else None
        self.class_names = list(VOC_CLASSES)
        self.lut = make_lut(range(21))

    def novel_classes(self, fold: int) -> List[int]:
        return list(range(5 * fold + 1, 5 * fold + 6))

    def box_rule(self) -> str:
        if (self.root / "SegmentationObject").is_dir():
            return "SegmentationObject instance maps (connected components where an image has none)"
        return "connected components (no SegmentationObject/ under the root)"

    def instance_boxes(self, i: int, label: np.ndarray, cls: int) -> List[Box]:
        path = self.root / "SegmentationObject" / (self.sample_id(i) + ".png")
        if not path.is_file():
            return super().instance_boxes(i, label, cls)
        objects = read_label(path)
        check_same_size(label, objects, self.samples[i][2], path)
        pixels = label == cls
        boxes = []
        for k in np.unique(objects[pixels]):
            if k in (0, IGNORE):
                continue
            ys, xs = np.nonzero(objects == k)
            boxes.append((int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1))
        # class pixels outside every instance (none in VOC's own maps; SBD's labels can differ from them):
        # boxed by their connected components, so no annotated object goes without a box
        return boxes + component_boxes(pixels & np.isin(objects, (0, IGNORE)))
