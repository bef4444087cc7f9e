"""A labelled folder: ``images/<id>.<ext>`` + ``labels/<id>.png`` (label value = class id) + a class
list (``data.classes``, relative to the root: ``id<TAB>name`` rows with an optional header, or one
name a line). Any number of classes; folds (``data.folds``: novel class ids per fold) and merges
(``data.merge``: ``{new name: [old ids]}``, all mapped to the group's first id; the name
``background`` maps them to 0) come from the config.

``data.params``: ``void`` (raw values read as ignore 255, e.g. MSRC-v2's 0), ``image_dir``, ``label_dir``,
``image_ext`` (guessed from the files when absent), ``split_lists`` (``{train|val|test: file of ids}``, or
``data.train_list`` / ``data.val_list`` for train / test; a split without its own list holds the images the test
list (and, for train, a val list) does not name; without any every split holds every image, which is sound only with
the ``bam`` training policy: every test query holds a novel class, so no training image is a test query; the
``pfenet`` policy is refused there), ``test_fraction`` (a deterministic image-level split by hashed id: the test
split holds that share of the images and train / val the rest; for sets with one pool and the ``pfenet`` policy,
e.g. the parsing sets, whose test queries would otherwise be training images with their novel pixels labelled
background), ``label_channel`` (for RGB-stored labels) and ``stuff`` (class ids that are scene background: base
classes in episodes, but background to BAM's base learner; ``Source.base_learner_classes``).

Used for MSRC-v2 (``configs/data/msrc_v2.yaml``), CCP and VITON parsing maps."""
import collections
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from ..index import held_out
from ..io import DataError, apply_lut, read_class_table, read_label, read_lines, under_root
from .base import IGNORE, Source, check_params, register_source

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp")  # read without data.params.image_ext (any case)
FOLDER_PARAMS = ["void", "stuff", "image_dir", "label_dir", "image_ext", "split_lists", "test_fraction",
                 "label_channel"]


def merged_lut(names: Dict[int, str], merge: Optional[Dict[str, List[int]]], void=()) -> tuple:
    """(class names list with None for ids merged away, raw -> class id LUT)."""
    if IGNORE in names and IGNORE not in void:  # its pixels would be read as ignore: never trained nor tested
        raise DataError(f"class table names id {IGNORE} ({names[IGNORE]!r}), the ignore label of every label map: "
                        f"renumber the classes past it (as FSS-1000's ids skip it) or list it in data.params.void")
    size = max(256, max(names) + 1)
    lut = np.full(size, -1, dtype=np.int64)
    class_names: List[Optional[str]] = [None] * (max(names) + 1)
    for i, n in names.items():
        lut[i] = i
        class_names[i] = n
    class_names[0] = class_names[0] or "background"
    for new_name, ids in (merge or {}).items():
        missing = [i for i in ids if i not in names]
        if missing:
            raise DataError(f"data.merge {new_name!r} names unknown class ids {missing}")
        target = 0 if new_name == "background" else ids[0]
        for i in ids:
            lut[i] = target
            class_names[i] = None
        if target:
            class_names[target] = new_name
    for v in void:
        lut[v] = IGNORE
        if v < len(class_names) and v != 0:
            class_names[v] = None
    lut[IGNORE] = IGNORE
    return class_names, lut


@register_source("folder")
class FolderSource(Source):
    def __init__(self, cfg_data, split: str, extra_params=()):
        super().__init__(split)
        params = check_params(cfg_data, FOLDER_PARAMS + list(extra_params))
        self.params = params
        self.root = Path(cfg_data.root)
        if not self.root.is_dir():
            raise DataError(f"missing dataset folder: {self.root}")
        names = self.class_table(cfg_data)
        self.class_names, self.lut = merged_lut(names, cfg_data.merge, params.get("void", ()))
        self.label_channel = int(params.get("label_channel", 0))
        self.samples = self.list_samples(params.get("image_dir", "images"), params.get("label_dir", "labels"),
                                         params.get("image_ext"), self.list_file(cfg_data, params, split))
        if params.get("test_fraction") is not None:
            self.samples = self.split_by_hash(self.samples, float(params["test_fraction"]), split)
        test_list = self.list_file(cfg_data, params, "test")
        val_list = (params.get("split_lists") or {}).get("val")  # (list_file reads data.train_list for val)
        val_list = val_list and under_root(val_list, self.root)
        other_lists = [test_list, val_list if split == "train" else None]
        if split != "test" and any(other_lists) and not self.list_file(cfg_data, params, split):
            # a split without its own list holds the images the others do not list (training takes neither a test
            # query nor a val image)
            held = {i for f in other_lists if f for i in read_lines(Path(f), "image list")}
            self.samples = [s for s in self.samples if s[0] not in held]
        self.test_holds_every_image = params.get("test_fraction") is None and not test_list
        self.folds = [sorted(f) for f in (cfg_data.folds or [])]
        self.stuff = sorted(params.get("stuff", ()))
        novel_stuff = sorted(set(self.stuff).intersection(c for f in self.folds for c in f))
        if novel_stuff:
            raise DataError(f"data.params.stuff classes {novel_stuff} are novel in a fold; stuff is base everywhere")
        self.num_folds = max(1, len(self.folds))
        for k, novel in enumerate(self.folds):
            bad = [c for c in novel if not (0 < c < len(self.class_names) and self.class_names[c])]
            if bad:
                raise DataError(f"data.folds[{k}] names class ids {bad} that are not foreground classes")

    def list_file(self, cfg_data, params, split: str) -> Optional[str]:
        """The split's id list: ``data.train_list`` (train) / ``data.val_list`` (test), e.g. a few-label
        subset, else ``params.split_lists``; val: ``split_lists.val``, else the train list. A path as given when it
        exists, else under the root."""
        chosen = cfg_data.val_list if split == "test" else cfg_data.train_list
        listed = (params.get("split_lists") or {}).get(split)
        if chosen and listed and split != "val":  # data.train_list names the train list, not val's
            raise DataError(f"both data.{'val' if split == 'test' else 'train'}_list and data.params.split_lists "
                            f"name the {split} list; give one")
        chosen = listed or chosen
        return str(under_root(chosen, self.root)) if chosen else None

    @staticmethod
    def split_by_hash(samples: list, fraction: float, split: str) -> list:
        """The test split: the images whose salted id hash falls under ``fraction``; train and val: the others
        (the salt keeps the test split independent of the training pools' unsalted val hold-out)."""
        if not 0 < fraction < 1:
            raise DataError(f"data.params.test_fraction must be in (0, 1), not {fraction}")
        kept = [s for s in samples if held_out(s[0], fraction, salt="test:") == (split == "test")]
        if not kept:
            raise DataError(f"test_fraction {fraction} leaves the {split} split of {len(samples)} images empty")
        return kept

    def class_table(self, cfg_data) -> Dict[int, str]:
        if not cfg_data.classes:
            raise DataError("folder dataset needs data.classes (a class-list file)")
        path = Path(cfg_data.classes)
        return read_class_table(path if path.is_absolute() else self.root / path)

    def list_samples(self, image_dir: str, label_dir: str, image_ext: Optional[str], list_file: Optional[str]):
        images = self.root / image_dir
        if not images.is_dir():
            raise DataError(f"missing image folder: {images}")
        if list_file:
            # once each, in first-seen order (as PASCAL's and COCO's lists): an id listed twice would be two samples,
            # and an episode could take the query's own image as its support
            ids = list(dict.fromkeys(read_lines(Path(list_file), "image list")))  # resolved by list_file()
            if image_ext is None:
                found: Dict[str, List[str]] = {}
                for p in images.iterdir():
                    if p.suffix.lower() in IMAGE_EXTS:
                        found.setdefault(p.stem, []).append(p.name)
                missing = [i for i in ids if i not in found]
                if missing:
                    raise DataError(f"missing image file for id {missing[0]!r} in {images} ({len(missing)} missing; "
                                    f"types read: {', '.join(IMAGE_EXTS)}; data.params.image_ext names another)")
                twice = [i for i in ids if len(found[i]) > 1]  # which one is read would follow the directory order
                if twice:
                    raise DataError(f"id {twice[0]!r} has several image files in {images} "
                                    f"({', '.join(sorted(found[twice[0]]))}): name one type as data.params.image_ext")
                paths = [images / found[i][0] for i in ids]
            else:
                paths = [images / (i + image_ext) for i in ids]
        else:
            exts = (image_ext,) if image_ext else IMAGE_EXTS
            files = [p for p in images.iterdir() if p.is_file() and not p.name.startswith(".")]
            paths = sorted(p for p in files if p.suffix.lower() in exts)
            others = sorted({p.suffix.lower() or p.name for p in files} - set(exts))
            if others:  # a .tif or .webp folder would otherwise lose those images without a word
                warnings.warn(f"{images}: files of types {others} are not read as images (types read: "
                              f"{', '.join(exts)}; data.params.image_ext names another)", stacklevel=2)
            stems = collections.Counter(p.stem for p in paths)
            twice = sorted(s for s, n in stems.items() if n > 1)  # one id, one label: an episode's support
            if twice:                                             # could be its query's own picture
                raise DataError(f"id {twice[0]!r} has several image files in {images} "
                                f"({', '.join(p.name for p in paths if p.stem == twice[0])}): name one type as "
                                f"data.params.image_ext")
        if not paths:
            raise DataError(f"no image in {images}")
        return [(p.stem, str(p), str(self.root / label_dir / (p.stem + ".png"))) for p in paths]

    def load_label(self, i: int) -> np.ndarray:
        path = self.samples[i][2]
        return apply_lut(read_label(path, self.label_channel), self.lut, path)

    def novel_classes(self, fold: int) -> List[int]:
        if not self.folds:
            raise DataError(f"dataset {self.name!r} at {self.root} has no folds: set data.folds")
        return self.folds[fold]
