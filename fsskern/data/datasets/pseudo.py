"""UMTFSS pseudo-label folder (unsupervised meta-training), as ``fsskern.pseudo_tasks`` builds it
(docs/pseudo_tasks.md): ``pseudo/<id>.png`` (palette PNG at the original resolution, value = cluster
0..N-1, no ignore value) and ``index.json``. Cluster n is class n + 1 here, so that 0 stays
"background" (= every other cluster of the episode's image). There are no folds: every cluster is a
base class.

``index.json``: ``{"version": 1, "num_clusters": N, "samples": [ids]}`` (optionally ``"image_ext"``;
images in ``images/<id><ext>``), or version 2 from the builder, which adds ``image_root`` + ``images``
(the images are read in place), ``filters``, and the region table / neighbour lists (``regions``,
``neighbours``, .npy files) that UMTFSS draws supports from.

Region filters (UMTFSS code, ``util/pseudo_dataset.py``): a cluster counts in an image only if it
covers >= ``min_pixels`` (the class index's 2048) and leaves >= 1 % of the image's rows *and* >= 1 %
of its columns free (``span`` = 0.99: a region spanning 99 % of the height or width is "stuff"). The
labels are stored unfiltered; the filters apply when the class index reads them (``span_filter``, which
the builder also uses for its region lists). A version-2 index records the filters it was built with,
and a config whose filters differ is refused: its pools would not match the neighbour lists.

``data.params``: ``span``, ``index`` (file name), ``label_dir``, ``build`` (the builder's block,
read by ``fsskern.pseudo_tasks``) and ``support_neighbours`` (default true: with a region table,
``train_episodes`` draws a query's supports from its region's neighbour list)."""
import json
import math
from collections import Counter
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from ..episodes import EpisodeSpec, TrainEpisodes, episode_rng, key_seed, make_episode, others_in
from ..io import DataError
from .base import Source, check_params, make_lut, register_source


def read_span(value) -> float:
    """``data.params.span`` as a fraction in (0, 1]: 99 (a percentage) would keep every region, the full-width
    ones included, and 0 none."""
    try:
        span = float(value)
    except (TypeError, ValueError):
        span = math.nan
    if not 0 < span <= 1:
        raise DataError(f"data.params.span must be a fraction in (0, 1] (the paper's 0.99), got {value!r}")
    return span


def span_filter(label: np.ndarray, span: float) -> Dict[int, int]:
    """{value: pixels} of the values of ``label`` whose region leaves >= (1 - span) of the rows and
    >= (1 - span) of the columns free (one pass over the pixels)."""
    h, w = label.shape
    counts = np.bincount(label.ravel())
    rows = np.zeros((len(counts), h), bool)
    rows[label, np.arange(h)[:, None]] = True
    cols = np.zeros((len(counts), w), bool)
    cols[label, np.arange(w)[None, :]] = True
    free_rows, free_cols = h - rows.sum(1), w - cols.sum(1)
    least = 1 - span - 1e-9  # 1 - 0.99 is 0.010000000000000009: 1 free row of 100 is 1 %, kept
    keep = (counts > 0) & (free_rows >= least * h) & (free_cols >= least * w)
    return {int(v): int(counts[v]) for v in np.flatnonzero(keep)}


@register_source("pseudo")
class PseudoSource(Source):
    num_folds = 1

    def __init__(self, cfg_data, split: str):
        super().__init__(split)
        params = check_params(cfg_data, ["span", "index", "label_dir", "build", "support_neighbours"])
        self.root = root = Path(cfg_data.root)
        index_path = root / params.get("index", "index.json")
        if not index_path.is_file():
            hint = " (python/build_pseudo_tasks.py or python/train.py builds it from data.params.build)" \
                if "build" in params else ""
            raise DataError(f"missing pseudo-label index file: {index_path}{hint}")
        try:
            index = json.loads(index_path.read_text())
            n, ids = int(index["num_clusters"]), list(index["samples"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"bad pseudo-label index {index_path}: {e!r}") from None
        if not ids:
            raise DataError(f"empty pseudo-label index: {index_path}")
        if len(set(ids)) < len(ids):  # a repeated image would be two samples, so a query could be its own support
            repeated = sorted(i for i, n in Counter(ids).items() if n > 1)  # linear: COCO's index is ~100k ids
            raise DataError(f"bad pseudo-label index {index_path}: samples repeat {repeated[:5]}")
        if not 1 <= n <= 254:  # cluster c is class c + 1, and 255 is the ignore value
            raise DataError(f"bad pseudo-label index {index_path}: num_clusters {n}, not in 1..254 (cluster 254 "
                            "would be read as the ignore label)")
        filters = index.get("filters")
        self.span = read_span(params.get("span", (filters or {}).get("span", 0.99)))
        if filters and (self.span, int(cfg_data.min_pixels)) != (filters["span"], filters["min_pixels"]):
            raise DataError(f"{index_path} was built with span {filters['span']} and min_pixels "
                            f"{filters['min_pixels']}; the config asks for span {self.span} and min_pixels "
                            f"{cfg_data.min_pixels} (the neighbour lists follow the built filters): set them "
                            f"equal, or rebuild into another data.root")
        if "images" in index:
            image_root = Path(index["image_root"])
            image_root = image_root if image_root.is_absolute() else root / image_root
            images = [image_root / p for p in index["images"]]
            if len(images) != len(ids):
                raise DataError(f"bad pseudo-label index {index_path}: {len(images)} images for {len(ids)} samples")
        else:
            images = [root / "images" / (i + index.get("image_ext", ".jpg")) for i in ids]
        label_dir = root / params.get("label_dir", "pseudo")
        self.samples = [(i, str(p), str(label_dir / (i + ".png"))) for i, p in zip(ids, images)]
        self.class_names = ["background"] + [f"cluster{c}" for c in range(n)]
        self.lut = make_lut([], ignore=(), remap={c: c + 1 for c in range(n)})
        # the build key is part of describe(), so of the class-index cache key: a folder rebuilt with another
        # seed never reads the cached index of the previous build
        self.build_key = (index.get("build") or {}).get("key")
        self.region_files = None
        if params.get("support_neighbours", True) and index.get("regions"):
            self.region_files = (root / index["regions"], root / index["neighbours"])

    def class_pixels(self, label: np.ndarray) -> Dict[int, int]:
        return {c: n for c, n in span_filter(label, self.span).items() if c not in (0, self.ignore_index)}

    def novel_classes(self, fold: int) -> List[int]:
        return []

    def describe(self) -> dict:
        return {**super().describe(), "span_filter": self.span, "support_neighbours": self.region_files is not None,
                "build_key": self.build_key}

    def train_episodes(self, pools: Dict[int, Sequence[int]], key: dict, shots: int = 1, ways: int = 1):
        """Training episodes: ``NeighbourEpisodes`` when the index has neighbour lists (and
        ``support_neighbours`` is on), else the plain ``TrainEpisodes``."""
        if self.region_files is None:
            return TrainEpisodes(pools, key, shots, ways)
        try:
            regions, neighbours = (np.load(p, mmap_mode="r") for p in self.region_files)
        except (OSError, ValueError) as e:
            raise DataError(f"unreadable pseudo-task region files {self.region_files}: {e}") from None
        return NeighbourEpisodes(pools, {**key, "supports": "neighbours"}, shots, ways, regions, neighbours)


class NeighbourEpisodes(TrainEpisodes):
    """UMTFSS support selection (paper: "only top 50 percent nearest regions are used for randomly
    K-shot support set selection"; code ``util/pseudo_dataset.py``): the query, its class and the order
    as ``TrainEpisodes``; the supports of the query's class come from the neighbour list of the query's
    region of that class, restricted to that class's training pool (held-out images left out).

    Resolutions (ours): the K supports are distinct (the code draws each shot independently, so shots
    may repeat); when the list leaves fewer than K candidates the whole pool is used. Other ways of a
    k-way episode draw from their pools (the query holds no region of them)."""

    def __init__(self, pools, key: dict, shots: int, ways: int, regions: np.ndarray, neighbours: np.ndarray):
        super().__init__(pools, key, shots, ways)
        self.members = {c: set(p) for c, p in self.support_pools.items()}
        self.lists = {(int(s), int(c) + 1): (int(a), int(n)) for s, c, _, a, n in np.asarray(regions)}
        self.neighbours = neighbours

    def candidates(self, query: int, cls: int) -> List[int]:
        """The sorted support candidates of ``query`` for class ``cls``."""
        start, n = self.lists.get((query, cls), (0, 0))
        keep = self.members.get(cls, set())
        near = sorted({int(s) for s in self.neighbours[start:start + n]} & keep)
        return near if others_in(near, query)[0] >= self.shots else self.support_pools[cls]

    def episode(self, epoch: int, i: int) -> EpisodeSpec:
        slot = int(self.order(epoch)[i])
        q = self.queries[slot]
        rng = episode_rng(self.key, epoch, i)
        for _ in range(100):  # as TrainEpisodes.episode, with the query class's pool replaced
            cls = [self.query_classes[slot][int(rng.integers(len(self.query_classes[slot])))]]
            others = [c for c in self.classes if c != cls[0]]
            if self.ways > 1:
                cls += [others[int(k)] for k in rng.choice(len(others), self.ways - 1, replace=False)]
            pools = {**self.support_pools, cls[0]: self.candidates(q, cls[0])}
            if all(others_in(pools[c], q)[0] >= self.shots for c in cls):
                return make_episode(rng, q, cls, pools, self.shots, key_seed(self.key, epoch, i, "aug"))
        raise DataError(f"no class of query sample {q} has {self.shots} support image(s) other than the query")
