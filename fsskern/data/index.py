"""Which images hold which classes: one scan of the labels at the original resolution, cached as
JSON keyed by the sha256 of (index version, source, sample list with each label file's size and mtime,
label mapping, filter parameters), so a changed list, label or filter never reads a stale cache (HDMNet#15).

Two keys: the cache file's (``index_key``: where the labels are, as absolute paths) and the one that
seeds every episode (``LabelStats.key``, from ``episode_key``: what the labels hold, never where they
are), so the same data gives the same manifests on every machine and under any spelling of
``data.root`` (docs/data.md says what the earlier, path-seeded manifests mean for old figures).

A class counts for an image when it covers >= ``min_pixels`` (2 * 32 * 32 = 2048, the OSLSM rule
that PFENet applies to its lists) after the source's own region filter (pseudo labels). The scan
keeps every class's pixel count, so any ``min_pixels`` and both training policies derive from it:

- ``pfenet``: keep every training image; novel pixels become background in training labels;
- ``bam``: drop every training image that holds any pixel of a novel class (BAM ``filter_intersection``).
"""
import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .io import DataError, image_size

INDEX_VERSION = 1
POLICIES = ("pfenet", "bam")


def default_cache_dir() -> Path:
    return Path(os.environ.get("FSSKERN_CACHE", Path.home() / ".cache" / "fsskern")) / "index"


@dataclass
class LabelStats:
    """Per sample: {foreground class id: pixels}; samples that failed to load (skip mode) are in
    ``skipped`` ({sample index: message}) and hold no class. ``key`` seeds the episodes drawn from it
    (``episode_key``)."""
    pixels: List[Dict[int, int]]
    skipped: Dict[int, str] = field(default_factory=dict)
    key: str = ""

    def class_index(self, min_pixels: int = 2048, samples: Optional[Sequence[int]] = None) -> Dict[int, List[int]]:
        """{class id: sample indices (ascending) where the class covers >= min_pixels}."""
        out: Dict[int, List[int]] = {}
        for i in (range(len(self.pixels)) if samples is None else samples):
            for c, n in self.pixels[i].items():
                if n >= min_pixels:
                    out.setdefault(c, []).append(i)
        return {c: out[c] for c in sorted(out)}

    def present(self, i: int) -> List[int]:
        """Every foreground class with at least one pixel in sample i."""
        return sorted(self.pixels[i])


def _source_digest(source, **fields) -> str:
    """sha256 of the index version, the source's kind, description and label mapping, and ``fields``."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": INDEX_VERSION, "source": type(source).__name__, "describe": source.describe(),
                         **fields}, sort_keys=True).encode())
    h.update(np.ascontiguousarray(source.lut).tobytes())
    return h.hexdigest()


def _stamp(path) -> tuple:
    """(size, modification time in ns) of a file, (-1, -1) when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


def index_key(source, check_images: str = "none") -> str:
    """The cache key: the label files by absolute path (two copies of a dataset never share a cache
    entry; two spellings of one folder do), with each file's size and modification time (a label rewritten
    in place is read again), and how they are read."""
    # label_channel (RGB-stored labels) changes what is read; kept out of describe(), and so out of episode_key:
    # the episodes of every folder source would have moved with it
    return _source_digest(source, check_images=check_images, label_channel=getattr(source, "label_channel", None),
                          samples=[(s[0], os.path.abspath(s[2]), *_stamp(s[2])) for s in source.samples])


def episode_key(source, pixels: List[Dict[int, int]], skipped: Dict[int, str]) -> str:
    """The key episodes are seeded from: sample ids and every sample's class pixels, no path."""
    return _source_digest(source, ids=[s[0] for s in source.samples], pixels=pixels, skipped=sorted(skipped))


def check_image(source, i: int, label: np.ndarray, mode: str) -> None:
    """``header``: the image exists and has the label's size (reads the header only); ``decode``: it also
    decodes in full (finds truncated files)."""
    if mode == "decode":
        source.load(i)
        return
    _, image_path, label_path = source.samples[i]
    w, h = image_size(image_path)
    if (h, w) != label.shape:
        raise DataError(f"image/label size mismatch: {image_path} is {w}x{h}, {label_path} is "
                        f"{label.shape[1]}x{label.shape[0]} (width x height)")


_WORKER_SOURCE = None


def _init_worker(source) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _scan_in_worker(args):
    return _scan(_WORKER_SOURCE, *args)


def _scan(source, i: int, check_images: str):
    """(class pixels, None) or (None, error message) for one sample."""
    try:
        label = source.load_label(i)
        if check_images != "none":
            check_image(source, i, label, check_images)
        return source.class_pixels(label), None
    except DataError as e:
        return None, str(e)


def scan_labels(source, cache_dir=None, on_error: str = "raise", check_images: str = "none",
                workers: int = 0) -> LabelStats:
    """Read every label of ``source`` once (or the cache). ``on_error="skip"`` records a bad sample in
    ``skipped`` instead of raising; the count is reported, never hidden. ``check_images`` (none | header
    | decode) also checks each image, so that skip mode catches bad images before training meets them.
    ``workers`` > 0 reads the labels in that many processes (COCO: 82k labels); the result is the same."""
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be raise or skip, not {on_error!r}")
    if check_images not in ("none", "header", "decode"):
        raise DataError(f"check_images must be none, header or decode, not {check_images!r}")
    if len(source) == 0:
        raise DataError(f"dataset {source.name!r} split {source.split!r} has no sample")
    key = index_key(source, check_images)
    path = Path(cache_dir or default_cache_dir()) / f"{source.name}-{key[:16]}.json"
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key and (on_error == "skip" or not cached["skipped"]):
            pixels = [{int(c): n for c, n in p.items()} for p in cached["pixels"]]
            skipped = {int(i): m for i, m in cached["skipped"].items()}
            return LabelStats(pixels, skipped, episode_key(source, pixels, skipped))
    pixels, skipped = [], {}
    jobs = [(i, check_images) for i in range(len(source))]
    if workers > 0:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(source,)) as pool:
            results = list(pool.map(_scan_in_worker, jobs, chunksize=64))
    else:
        results = (_scan(source, *job) for job in jobs)
    for i, (counts, error) in enumerate(results):
        if error is not None:
            if on_error == "raise":
                raise DataError(error)
            skipped[i] = error
        pixels.append(counts or {})
    if skipped:
        warnings.warn(f"{source.name} {source.split}: skipped {len(skipped)} of {len(source)} samples with bad "
                      f"files (first: {next(iter(skipped.values()))})")
    stats = LabelStats(pixels, skipped, episode_key(source, pixels, skipped))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "version": INDEX_VERSION, "pixels": pixels, "skipped": skipped}))
        tmp.replace(path)
    except OSError as e:  # a read-only cache is slower, not wrong
        warnings.warn(f"class index cache not written to {path}: {e}")
    return stats


def class_index(source, min_pixels: int = 2048, cache_dir=None, on_error: str = "raise") -> Dict[int, List[int]]:
    """``{class_id: [sample indices]}`` counting a class where it covers >= min_pixels (contract)."""
    return scan_labels(source, cache_dir, on_error).class_index(min_pixels)


@dataclass
class TrainingPools:
    """Base-class sample pools of the training split for one fold: ``train`` for meta-training,
    ``val`` for model selection (held-out images of the base classes, or the images of the validation
    classes; never a test class)."""
    base: List[int]           # the classes training sees (the fold's base classes less any validation class)
    novel: List[int]
    train: Dict[int, List[int]]
    val: Dict[int, List[int]]
    dropped: int            # images removed by the bam policy
    empty_classes: List[int]  # base classes with no qualifying image (never sampled)
    index_key: str = ""       # the LabelStats key these pools come from


def held_out(sample_id: str, fraction: float, salt: str = "") -> bool:
    """Deterministic image-level hold-out: the same images for any fold, seed or machine. A different
    ``salt`` draws a hold-out independent of the unsalted one (a test split beside the validation split)."""
    return int(hashlib.sha256((salt + sample_id).encode()).hexdigest()[:8], 16) / 0x100000000 < fraction


def training_base(base: Sequence[int], val_classes: Sequence[int] = ()) -> List[int]:
    """The classes training sees: the fold's base classes less the validation classes."""
    held = set(val_classes)
    return [c for c in base if c not in held]


def training_pools(source, stats: LabelStats, fold: int, policy: str = "pfenet", min_pixels: int = 2048,
                   val_fraction: float = 0.0, val_classes: Sequence[int] = ()) -> TrainingPools:
    """The fold's training and validation pools. Validation holds out either a fraction of the images
    (``val_fraction``: episodes of the base classes on images training never sees) or whole base classes
    (``val_classes``: episodes of classes training never sees, as the test's are). A validation class is
    out of ``base``, and every image holding any pixel of one is out of training whatever the policy, so no
    validation query or support was ever a training image; its episodes come from the images the policy
    keeps for the fold (under bam: none holding a test class)."""
    if policy not in POLICIES:
        raise DataError(f"unknown training policy {policy!r}; expected one of {POLICIES}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), not {val_fraction}")
    if policy == "pfenet" and source.test_holds_every_image:
        raise DataError(f"{source.name}: its test split holds every image (no split list, data.val_list or "
                        f"data.params.test_fraction), so under the pfenet policy the test queries would be training "
                        f"images with their novel pixels as background: use data.train_policy=bam (no training "
                        f"image holds a novel class), or split the set")
    base, novel = source.fold_classes(fold)
    novel_set, val_set_classes = set(novel), set(val_classes)
    if val_set_classes:
        if val_fraction > 0:
            raise DataError("data.val_classes and data.val_fraction both hold validation out: set one of them "
                            "(data.val_fraction=0 to validate on the classes)")
        stray = sorted(val_set_classes - set(base))
        if stray:
            raise DataError(f"data.val_classes {stray} are not base classes of {source.name} fold {fold} "
                            f"(base: {sorted(base)})")
        base = training_base(base, val_classes)
    base_set = set(base)
    keep, dropped = [], 0
    for i in range(len(source)):
        if i in stats.skipped:
            continue
        if policy == "bam" and novel_set.intersection(stats.pixels[i]):
            dropped += 1
            continue
        keep.append(i)
    if val_set_classes:
        val_ids = [i for i in keep if val_set_classes.intersection(stats.pixels[i])]
        val = {c: v for c, v in stats.class_index(min_pixels, val_ids).items() if c in val_set_classes}
    else:
        val_ids = [i for i in keep if held_out(source.sample_id(i), val_fraction)]
        val = {c: v for c, v in stats.class_index(min_pixels, val_ids).items() if c in base_set}
    val_set = set(val_ids)
    train = {c: v for c, v in stats.class_index(min_pixels, [i for i in keep if i not in val_set]).items()
             if c in base_set}
    if not train:
        raise DataError(f"{source.name} fold {fold}: no training image holds a base class with >= {min_pixels} px")
    return TrainingPools(base, novel, train, val, dropped, [c for c in base if c not in train], stats.key)


def test_pool(source, stats: LabelStats, fold: int, min_pixels: int = 2048) -> Tuple[List[int], Dict[int, List[int]]]:
    """(novel classes, {novel class: sample indices with >= min_pixels}); every novel class must have one."""
    _, novel = source.fold_classes(fold)
    index = stats.class_index(min_pixels)
    empty = [c for c in novel if not index.get(c)]
    if empty:
        names = [source.class_names[c] for c in empty]
        raise DataError(f"{source.name} {source.split} fold {fold}: no image with >= {min_pixels} px of class(es) "
                        f"{empty} {names}")
    return novel, {c: index[c] for c in novel}


def base_label_lut(base: Sequence[int], size: int = 256) -> np.ndarray:
    """Label map -> base-learner label space (BAM): base classes 1..n_base in ascending id order,
    background and every other class 0, 255 stays 255. Past 254 base classes (FSS-1000's 520) base class 255 meets
    the ignore label; the models that read base_label (BAM, RILFS) refuse base_classes >= 255."""
    lut = np.zeros(size, dtype=np.int64)
    for k, c in enumerate(sorted(base), start=1):
        lut[c] = k
    lut[255] = 255
    return lut


def class_index_from_lists(source, path) -> Dict[int, List[int]]:
    """A PFENet/BAM class list (``sub_class_file_list_{k}.txt``: a Python dict literal
    ``{class: [[image path, label path], ...]}``, read with ``ast.literal_eval``, never ``eval``) as
    ``{class: [sample indices]}`` of ``source``, to reproduce those lists exactly or to compare them
    with this index (``compare_indexes``). An image the source does not list is an error."""
    import ast
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing class list file: {path}")
    try:
        lists = ast.literal_eval(path.read_text())
    except (ValueError, SyntaxError) as e:
        raise DataError(f"class list {path} is not a Python dict literal: {e}") from None
    by_id = {source.sample_id(i): i for i in range(len(source))}
    out: Dict[int, List[int]] = {}
    for c, pairs in lists.items():
        ids = [Path(p[0] if isinstance(p, (list, tuple)) else p).stem for p in pairs]
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise DataError(f"class list {path}: class {c} names {len(unknown)} image(s) the source does not list "
                            f"(first: {unknown[0]!r})")
        out[int(c)] = sorted(by_id[i] for i in ids)
    return {c: out[c] for c in sorted(out)}


def compare_indexes(ours: Dict[int, List[int]], theirs: Dict[int, List[int]]) -> Dict[int, Tuple[List[int], List[int]]]:
    """{class: (samples only in ours, samples only in theirs)} for the classes where they differ."""
    diff = {}
    for c in sorted(set(ours) | set(theirs)):
        a, b = set(ours.get(c, ())), set(theirs.get(c, ()))
        if a != b:
            diff[c] = (sorted(a - b), sorted(b - a))
    return diff
