"""COCO-20i: images + PNG label maps (0 bg, 1..80 = COCO category ids in sorted order, 255 ignore),
and the converter from an instances JSON (pycocotools) that writes those maps.

Layout (``data.root``): pair lists ``lists/train.txt`` (splits "train" and "val") and
``lists/val.txt`` ("test"), one ``<image path> <label path>`` a line relative to the root, as
``python/prepare_data.py coco`` writes them (PFENet's list format); ``data.train_list`` /
``data.val_list`` override them. ``classes.txt`` (written by the converter) names the classes; the
80 COCO names are the default.

Fold conventions (``data.fold_convention``; record which one a result used):
- ``interleaved`` (PFENet ``use_split_coco``, BAM "FWB", HSNet): fold k novel = {4j + k + 1}
- ``contiguous`` (PANet): fold k novel = {20k + 1, ..., 20k + 20}
- ``canet`` (CANet's class protocol, CRCNet Tab. 13): one fold of 40 training, 20 validation and 20 test
  classes (``CANET_SPLIT``); base = the 40; novel = the 20 test classes for "test", the 20 validation
  classes for "val" (a source for class-level model selection; the engine's own selection uses held-out
  base-class images, as for every dataset) and all 40 others for "train", so both training policies keep
  every one of them out of training

Conversion rules (``convert_instances``; version ``CONVERTER_VERSION`` is written next to the PNGs):
- class id = 1 + rank of the category id among the JSON's sorted category ids;
- overlap: instances are painted from the largest area to the smallest, so where instances overlap
  the **smaller instance wins** (a person on a sofa stays a person); ties keep JSON order;
- crowd (``iscrowd=1``) regions become 255 (ignore) only where no non-crowd instance is painted, so a
  crowd box never erases a labelled instance; images with no annotation get an all-0 map.
"""
import json
from pathlib import Path
from typing import List

import numpy as np

from ..io import DataError, read_class_table, read_lines, under_root
from .base import Source, check_params, make_lut, register_source
from .pascal import parse_list

CONVERTER_VERSION = 1
COCO_CLASSES = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush"]


# Neither CANet nor CRCNet lists its 40 / 20 / 20 classes (CRCNet notes #34), so this split is ours, fixed and
# published here: the ids 1..80 permuted by numpy.random.Generator(PCG64(2019)) (CANet's year), the first 40
# for training, the next 20 for validation, the last 20 for test, each sorted (a test redraws it).
CANET_SPLIT = {
    "train": [7, 8, 9, 10, 12, 13, 14, 15, 16, 18, 19, 22, 24, 26, 28, 30, 32, 33, 42, 43, 44, 45, 46, 50, 52, 55, 57,
              58, 59, 61, 63, 65, 66, 67, 68, 69, 70, 72, 73, 74],
    "val": [1, 2, 17, 20, 27, 31, 36, 38, 39, 40, 47, 48, 49, 53, 60, 64, 71, 77, 78, 79],
    "test": [3, 4, 5, 6, 11, 21, 23, 25, 29, 34, 35, 37, 41, 51, 54, 56, 62, 75, 76, 80],
}


CONVENTIONS = ("interleaved", "contiguous", "canet")


def coco_novel_classes(fold: int, convention: str, num_classes: int = 80) -> List[int]:
    """Fold ``fold``'s novel classes under one of the four-fold conventions."""
    if convention == "interleaved":
        novel = [4 * j + fold + 1 for j in range(num_classes // 4 + 1)]
    elif convention == "contiguous":
        per = num_classes // 4
        novel = list(range(per * fold + 1, per * fold + per + 1))
    else:
        raise DataError(f"unknown COCO fold convention {convention!r}; expected interleaved or contiguous")
    return [c for c in novel if c <= num_classes]


@register_source("coco")
class CocoSource(Source):
    num_folds = 4

    def __init__(self, cfg_data, split: str):
        super().__init__(split)
        check_params(cfg_data, [])
        root = Path(cfg_data.root)
        chosen = cfg_data.val_list if split == "test" else cfg_data.train_list
        default = root / "lists" / ("val.txt" if split == "test" else "train.txt")
        list_path = under_root(chosen, root) if chosen else default
        self.list_path = str(list_path)
        self.samples, _ = parse_list(read_lines(list_path, "image list"), root, "images", "annotations",
                                     ".jpg", ".png", list_path)
        names = COCO_CLASSES
        if (root / "classes.txt").is_file():
            table = read_class_table(root / "classes.txt")
            names = [table[k] for k in sorted(table)]
            if 0 in table and table[0].lower() in ("background", "bg", "__background__"):
                names = names[1:]  # id 0 is background; a list of names alone numbers them 1.. (it lost person)
        self.class_names = ["background"] + list(names)
        self.convention = cfg_data.fold_convention
        if self.convention not in CONVENTIONS:
            raise DataError(f"unknown COCO fold convention {self.convention!r}; "
                            f"expected one of {', '.join(CONVENTIONS)}")
        if self.convention == "canet":
            self.num_folds = 1
            if len(self.class_names) != 81:
                raise DataError(f"the canet class protocol splits the 80 COCO classes; {root} has "
                                f"{len(self.class_names) - 1}")
        self.lut = make_lut(range(len(self.class_names)))

    def fold_classes(self, fold: int):
        if self.convention != "canet":
            return super().fold_classes(fold)
        self.check_fold(fold)
        return list(CANET_SPLIT["train"]), self.novel_classes(fold)

    def novel_classes(self, fold: int) -> List[int]:
        if self.convention == "canet":
            groups = {"train": ("val", "test"), "val": ("val",), "test": ("test",)}[self.split]
            return sorted(c for g in groups for c in CANET_SPLIT[g])
        novel = coco_novel_classes(fold, self.convention, len(self.class_names) - 1)
        if not novel:
            raise DataError(f"fold {fold} has no novel class among the {len(self.class_names) - 1} classes")
        return novel

    def describe(self) -> dict:
        return {**super().describe(), "fold_convention": self.convention}


def convert_instances(json_path, out_dir, image_ids=None) -> dict:
    """Write one PNG label map per image of an instances JSON into ``out_dir`` (named after the
    image file, ``.png``) with the rules in the module docstring; returns a summary (also written to
    ``out_dir/conversion.json``) with the class table and counts."""
    from PIL import Image
    from pycocotools.coco import COCO
    from pycocotools import mask as mask_utils
    import contextlib
    import io as _io

    json_path = Path(json_path)
    if not json_path.is_file():
        raise DataError(f"missing COCO annotation file: {json_path}")
    with contextlib.redirect_stdout(_io.StringIO()):  # pycocotools prints progress
        coco = COCO(str(json_path))
    cat_ids = sorted(coco.getCatIds())
    to_class = {cid: i + 1 for i, cid in enumerate(cat_ids)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = sorted(coco.getImgIds()) if image_ids is None else list(image_ids)
    crowd_pixels = 0
    for img_id in ids:
        info = coco.loadImgs(img_id)[0]
        h, w = info["height"], info["width"]
        label = np.zeros((h, w), dtype=np.uint8)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id, iscrowd=None))
        things = sorted((a for a in anns if not a.get("iscrowd", 0)), key=lambda a: -a["area"])  # stable sort
        painted = np.zeros((h, w), dtype=bool)
        for a in things:
            m = coco.annToMask(a).astype(bool)
            label[m] = to_class[a["category_id"]]
            painted |= m
        for a in anns:
            if a.get("iscrowd", 0):
                rle = coco.annToRLE(a)
                m = mask_utils.decode(rle).astype(bool) & ~painted
                label[m] = 255
                crowd_pixels += int(m.sum())
        Image.fromarray(label).save(out_dir / (Path(info["file_name"]).stem + ".png"))
    summary = {"converter_version": CONVERTER_VERSION, "source": str(json_path), "images": len(ids),
               "classes": {to_class[c]: coco.loadCats(c)[0]["name"] for c in cat_ids},
               "coco_category_ids": {to_class[c]: c for c in cat_ids}, "crowd_pixels": crowd_pixels,
               "rules": "largest instance painted first (smaller wins on overlap); crowd -> 255 where no instance"}
    (out_dir / "conversion.json").write_text(json.dumps(summary, indent=1))
    return summary
