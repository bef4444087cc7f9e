"""UMTFSS stage A: pseudo meta-tasks from unlabelled images (docs/pseudo_tasks.md; paper Eq. 3-4 and
``../shared/notes/methods/umtfss.md`` §2).

1. Dense embeddings of a frozen backbone, L2-normalised per cell (code: MoCo-v2 ResNet-50 layer4). An
   image is resized (longer side -> ``size``) onto a zero (= mean colour) ``size`` x ``size`` canvas, so
   batches share one shape; only the cells that cover the image are kept (the code clusters the padding
   cells too, notes §8.6 #4).
2. k-means (faiss) on the cells of a seeded random image sample (U'_train).
3. Eq. 4 for every pixel: scores -||f - c||^2 of the valid cells (cropped before upsampling: the code
   stretches the padded canvas onto the image, §8.6 #2), bilinear (align_corners) to the original size,
   argmax; then the Felzenszwalb majority vote in *every* segment (the code skips the last, §8.6 #3).
4. Regions: a cluster of an image that passes both filters of the ``pseudo`` source (one function,
   ``span_filter``, and the same ``min_pixels``), with the masked mean of the up-sampled descriptor
   map; per cluster of n regions, the top-min(floor(0.5 n), 5000) cosine neighbours (all if n < 20, among
   20,000 seeded candidates when n is larger), nearest first, the region's own image left out.

Resume and determinism: every file is written to a temporary name and renamed; ``.build/`` holds the
k-means vectors (a memory-mapped array plus a progress counter), the centroids and one record per
labelled image; ``index.json`` is written last. Every random draw comes from ``build.seed``, so the
same images, block, weights, batch size, device and thread count give byte-identical files, a resumed build's
included (its batches are the uninterrupted build's).
"""
import contextlib
import copy
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from .data.datasets.pseudo import read_span, span_filter
from .data.io import DataError, image_size, read_image
from .engine.config import Config, ConfigError, config_from_dict, with_overrides

INDEX_VERSION = 2
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
# Paper / code profile (notes §2.2); ``weights`` has no default on purpose.
DEFAULTS = {"images": None, "backbone": "resnet50", "weights": None, "layer": "layer4", "output_stride": 32,
            "size": 473, "assign_size": 640, "descriptor_size": None, "clusters": 50, "sample_images": 20000,
            "vectors_per_image": None, "kmeans": {"niter": 30, "max_points_per_centroid": 10_000_000},
            "superpixels": {"scale": 100.0, "sigma": 0.8, "min_size": 200},
            "neighbours": {"fraction": 0.5, "max": 5000, "all_below": 20, "max_candidates": 20000},
            "batch_size": 8, "device": None, "seed": 0}
NULL_OR_INT = ("descriptor_size", "sample_images", "vectors_per_image")
THROUGHPUT_ONLY = ("batch_size", "device")  # not in the reuse key


def build_spec(build: dict) -> dict:
    """The ``data.params.build`` block with defaults filled in; unknown keys and wrong types refused."""
    if not isinstance(build, dict):
        raise ConfigError(f"data.params.build must be a mapping, got {build!r}")
    unknown = sorted(set(build) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown data.params.build key(s) {unknown}; valid: {sorted(DEFAULTS)}")
    spec = copy.deepcopy(DEFAULTS)
    for key, value in build.items():
        default = DEFAULTS[key]
        if isinstance(default, dict) and value is not None:
            if not isinstance(value, dict) or set(value) - set(default):
                raise ConfigError(f"data.params.build.{key} takes the keys {sorted(default)}, got {value!r}")
            for k, v in value.items():
                spec[key][k] = _typed(f"{key}.{k}", v, default[k])
        elif value is None:
            if key not in NULL_OR_INT + ("superpixels", "device", "weights", "images"):
                raise ConfigError(f"data.params.build.{key} must not be null")
            spec[key] = None
        else:
            spec[key] = _typed(key, value, 0 if key in NULL_OR_INT else "" if key in ("device", "weights") else default)
    if not isinstance(spec["images"], dict) or "dataset" not in spec["images"]:
        raise ConfigError("data.params.build.images must give the unlabelled images as a data section "
                          "({dataset: ..., root: ..., split: train, ...})")
    if spec["weights"] is None:
        raise ConfigError("data.params.build.weights is required: 'imagenet' (mobilenet_v2) or a weights file "
                          "(paper: moco_v2_800ep_pretrain.pth.tar)")
    if not 2 <= spec["clusters"] <= 254:
        raise ConfigError(f"data.params.build.clusters must be in 2..254 (class id = cluster + 1 < 255), "
                          f"got {spec['clusters']}")
    for key in ("size", "assign_size", "descriptor_size", "sample_images", "vectors_per_image", "batch_size"):
        if spec[key] is not None and spec[key] < 1:
            raise ConfigError(f"data.params.build.{key} must be >= 1 (or null where allowed), got {spec[key]}")
    nb = spec["neighbours"]
    if not 0 < nb["fraction"] <= 1 or min(nb["max"], nb["max_candidates"]) < 1 or nb["all_below"] < 0:
        raise ConfigError(f"data.params.build.neighbours: fraction must be in (0, 1], max and max_candidates >= 1 "
                          f"and all_below >= 0; got {nb}")
    return spec


def _typed(name: str, value, default):
    if default is None:  # images: checked by its source
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ConfigError(f"data.params.build.{name} must be {type(default).__name__}, got {value!r}")
    return value


def image_list(spec: dict) -> Tuple[List[str], List[Path]]:
    """(sample ids, image paths) of ``build.images``: a source's image list; its labels are never read."""
    from .data.datasets import build_source
    section = dict(spec["images"])
    split = section.pop("split", "train")
    try:
        cfg_data = config_from_dict({"data": section}).data
    except ConfigError as e:
        raise ConfigError(f"data.params.build.images: {e}") from None
    source = build_source(cfg_data, split)
    if len(source) == 0:
        raise DataError(f"data.params.build.images: {cfg_data.dataset} at {cfg_data.root} lists no image")
    ids = [s[0] for s in source.samples]
    if len(set(ids)) != len(ids):
        raise DataError(f"data.params.build.images: sample ids repeat in {cfg_data.root} (pseudo labels are "
                        f"stored as <id>.png)")
    return ids, [Path(s[1]).resolve() for s in source.samples]


def weights_digest(weights: str) -> str:
    from .backbones import mobilenet_weights_file
    path = mobilenet_weights_file() if weights == "imagenet" else Path(weights)
    if not path.is_file():
        raise DataError(f"data.params.build.weights: weights file not found: {path}")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def task_key(spec: dict, filters: dict, ids: Sequence[str], paths: Sequence[Path], digest: str) -> str:
    """What decides reuse: the block (less its throughput settings and the images' spelling), the
    filters, the image list and the weights' content."""
    kept = {k: v for k, v in spec.items() if k not in THROUGHPUT_ONLY + ("images", "weights")}
    payload = {"version": INDEX_VERSION, "spec": kept, "filters": filters, "ids": list(ids),
               "paths": [str(p) for p in paths], "weights_sha256": digest}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ----------------------------------------------------------------------------------------- embedding
class Embedder:
    """A frozen backbone's ``layer`` output, L2-normalised per cell."""

    def __init__(self, spec: dict, device: str = "cpu"):
        from .backbones import create_backbone, freeze
        self.device = torch.device(device)
        net = create_backbone(spec["backbone"], spec["weights"], output_stride=spec["output_stride"])
        if spec["layer"] not in net.channels:
            raise ConfigError(f"data.params.build.layer {spec['layer']!r} is not a layer of {spec['backbone']} "
                              f"({sorted(net.channels)})")
        self.net, self.layer = freeze(net).to(self.device), spec["layer"]
        self.stride, self.channels = net.strides[self.layer], net.channels[self.layer]

    @torch.inference_mode()
    def _forward(self, x: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2)
        x = self.net(x, layers=(self.layer,))[self.layer]
        return F.normalize(x.float(), dim=1).cpu()

    def canvas(self, images: Sequence[np.ndarray], size: int) -> List[torch.Tensor]:
        """(C, h, w) unit embeddings of each image's valid cells: longer side -> ``size``, top-left on a
        ``size`` x ``size`` canvas of the mean colour (zero after normalisation)."""
        batch = np.zeros((len(images), size, size, 3), np.float32)
        cells = []
        for b, image in enumerate(images):
            h, w = resized_hw(image.shape[:2], size)
            batch[b, :h, :w] = (cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR) - MEAN) / STD
            cells.append(valid_cells((h, w), self.stride))
        feats = self._forward(batch)
        return [feats[b, :, :hv, :wv].contiguous() for b, (hv, wv) in enumerate(cells)]

    def original(self, image: np.ndarray) -> torch.Tensor:
        """(C, h, w) unit embeddings at the image's own resolution (code: region descriptors)."""
        return self._forward(((image.astype(np.float32) - MEAN) / STD)[None])[0]


def resized_hw(hw: Tuple[int, int], size: int) -> Tuple[int, int]:
    h, w = hw
    scale = size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def valid_cells(hw: Tuple[int, int], stride: int) -> Tuple[int, int]:
    """Cells that see the image: every stride-2 stage of these backbones maps n to ceil(n / 2)."""
    return math.ceil(hw[0] / stride), math.ceil(hw[1] / stride)


# ----------------------------------------------------------------------------------------- labels
def assign(feats: torch.Tensor, centroids: np.ndarray, hw: Tuple[int, int]) -> np.ndarray:
    """Eq. 4: argmin_n ||f - c_n|| per pixel, scored on the cells ((C, h, w) unit vectors) as
    2 f.c - ||c||^2 (= 1 - ||f - c||^2), bilinearly up-sampled (align_corners, as the code) to ``hw``."""
    c = torch.from_numpy(centroids)
    scores = 2 * torch.einsum("nc,chw->nhw", c, feats) - (c * c).sum(1)[:, None, None]
    up = F.interpolate(scores[None], size=hw, mode="bilinear", align_corners=True)[0]
    return up.argmax(0).numpy().astype(np.int64)


def superpixel_vote(label: np.ndarray, image: np.ndarray, num_clusters: int, scale: float, sigma: float,
                    min_size: int) -> np.ndarray:
    """Felzenszwalb segments of the original image; each takes its majority cluster (ties: lowest id)."""
    from skimage.segmentation import felzenszwalb
    seg = felzenszwalb(image, scale=scale, sigma=sigma, min_size=min_size, channel_axis=-1).astype(np.int64)
    counts = np.bincount((seg * num_clusters + label).ravel(), minlength=(int(seg.max()) + 1) * num_clusters)
    return counts.reshape(-1, num_clusters).argmax(1)[seg]


def interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of 1-D linear interpolation with align_corners=True."""
    a = np.zeros((n_out, n_in), np.float32)
    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (src - lo).astype(np.float32)
    np.add.at(a, (np.arange(n_out), lo), 1 - frac)
    np.add.at(a, (np.arange(n_out), hi), frac)
    return a


def masked_means(feats: torch.Tensor, label: np.ndarray, clusters: Sequence[int]) -> np.ndarray:
    """(K, C) mean of the bilinearly up-sampled (align_corners) map ``feats`` (C, h, w) over each
    cluster's pixels of ``label`` (H, W), without building the (C, H, W) map: interpolation is linear, so
    sum_p up(F)(p) m(p) = sum_ij F_ij (A_h^T m A_w)_ij."""
    ah, aw = interp_matrix(label.shape[0], feats.shape[1]), interp_matrix(label.shape[1], feats.shape[2])
    masks = (label[None] == np.asarray(clusters)[:, None, None]).astype(np.float32)
    # two matrix products (K h H W + K h W w multiply-adds); einsum's one three-operand loop costs K H W h w,
    # hours over COCO's images with descriptors at the original resolution
    weights = ((ah.T @ masks) @ aw).reshape(len(clusters), -1)
    sums = weights @ feats.reshape(feats.shape[0], -1).numpy().T
    return (sums / masks.reshape(len(clusters), -1).sum(1, keepdims=True)).astype(np.float32)


def palette() -> List[int]:
    """PASCAL VOC's bit-interleaved colour map (cluster n gets colour n)."""
    out = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


PALETTE = palette()


def write_png(path: Path, label: np.ndarray) -> None:
    im = Image.fromarray(label.astype(np.uint8))
    im.putpalette(PALETTE)  # L -> P: a palette PNG, read back as the indices
    path.parent.mkdir(parents=True, exist_ok=True)  # ids with a "/" (FSS-1000's class/stem) nest their labels
    tmp = path.with_name(path.name + ".tmp")
    im.save(tmp, format="PNG")
    tmp.replace(path)


def save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    tmp.replace(path)


# ----------------------------------------------------------------------------------------- neighbours
def neighbour_lists(desc: np.ndarray, nb: dict, rng: np.random.Generator) -> List[np.ndarray]:
    """Per region of one cluster (descriptors (n, C)): the indices of its top-k cosine neighbours
    (k = min(floor(fraction n), max); all others if n < all_below), nearest first, itself left out.
    With n > max_candidates the neighbours come from a seeded subset of that many regions (code)."""
    import faiss
    n = len(desc)
    k = n - 1 if n < nb["all_below"] else min(int(nb["fraction"] * n), nb["max"])
    if k <= 0:
        return [np.zeros(0, np.int64) for _ in range(n)]
    unit = np.ascontiguousarray(desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12), np.float32)
    cand = np.arange(n) if n <= nb["max_candidates"] else np.sort(rng.choice(n, nb["max_candidates"], replace=False))
    index = faiss.IndexFlatIP(unit.shape[1])
    index.add(unit[cand])
    _, found = index.search(unit, min(k + 1, len(cand)))
    out = []
    for r, row in enumerate(cand[found]):
        out.append(row[row != r][:k])
    return out


# ----------------------------------------------------------------------------------------- the build
class _State:
    """``.build/``: the resumable work of one build, tied to its key."""

    def __init__(self, root: Path, key: str):
        self.dir = root / ".build"
        self.records = self.dir / "records"
        state = self.dir / "state.json"
        if state.is_file() and json.loads(state.read_text()).get("key") != key:
            raise DataError(f"{self.dir} holds an unfinished build of another data.params.build block, image "
                            f"list or weights file; delete it to start over, or set another data.root")
        if not state.is_file() and self.dir.exists():
            shutil.rmtree(self.dir)  # a build that died before recording its key: nothing to resume
        self.records.mkdir(parents=True, exist_ok=True)
        write_json(state, {"key": key})


def build_pseudo_tasks(cfg_data, device: str = "cpu", progress: bool = True) -> dict:
    """Build (or finish building) the pseudo tasks of ``cfg_data`` (a ``dataset: pseudo`` data section
    with ``params.build``) into ``cfg_data.root``. Returns {"root", "images", "reused"} and, for a build,
    "regions", "kmeans_vectors" (None when resumed past k-means), "seconds" and "counts" (images) of the
    steps embed_sample, kmeans, embed_assign, assign, superpixels, embed_descriptor, regions, neighbours."""
    params = dict(cfg_data.params or {})
    spec = build_spec(params.get("build"))
    filters = {"min_pixels": int(cfg_data.min_pixels), "span": read_span(params.get("span", 0.99))}
    ids, paths = image_list(spec)
    key = task_key(spec, filters, ids, paths, weights_digest(spec["weights"]))
    root = Path(cfg_data.root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        index = root / "index.json"
        if index.is_file():
            built = json.loads(index.read_text()).get("build", {}).get("key")
            if built != key:
                raise DataError(f"{root} holds pseudo tasks built from another data.params.build block, image list "
                                f"or weights file (key {str(built)[:12]}, wanted {key[:12]}); delete {root} to "
                                f"rebuild, or set another data.root")
            return {"root": str(root), "images": len(ids), "reused": True}
        return _build(root, spec, filters, ids, paths, key, device if spec["device"] is None else spec["device"],
                      progress)


@contextlib.contextmanager
def _locked(path: Path):
    """One builder per folder (torchrun ranks, two runs): the others wait, then find it built."""
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _require_stage_a_packages() -> None:
    """faiss and scikit-image are the ``umtfss`` extra, imported where used: say so before a build, not with a
    bare ModuleNotFoundError after its embeddings."""
    missing = [name for name, module in (("faiss-cpu", "faiss"), ("scikit-image", "skimage"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise DataError(f"building pseudo tasks (UMTFSS stage A) needs {' and '.join(missing)}: pip install "
                        f"{' '.join(missing)} (or the package with its extra, pip install --no-build-isolation "
                        f"'.[umtfss]')")


def _build(root, spec, filters, ids, paths, key, device, progress) -> dict:
    _require_stage_a_packages()
    steps = ("embed_sample", "kmeans", "embed_assign", "assign", "superpixels", "embed_descriptor", "regions",
             "neighbours")
    seconds = {s: 0.0 for s in steps}
    counts = dict.fromkeys(seconds, 0)
    state = _State(root, key)
    embedder = Embedder(spec, device)
    rng = np.random.default_rng(spec["seed"])
    n_img, n_clu, bs = len(ids), spec["clusters"], spec["batch_size"]
    sample = np.arange(n_img) if spec["sample_images"] is None or spec["sample_images"] >= n_img else \
        np.sort(rng.choice(n_img, spec["sample_images"], replace=False))

    # 1-2. k-means on the valid cells of the sample, stored as they come so that a kill loses one batch
    centroids_path, n_vectors = state.dir / "centroids.npy", None
    if not centroids_path.is_file():
        vectors = _sample_vectors(state, embedder, spec, paths, sample, seconds, counts, progress)
        t = time.perf_counter()
        centroids = run_kmeans(vectors, n_clu, spec["kmeans"], spec["seed"])
        seconds["kmeans"] += time.perf_counter() - t
        counts["kmeans"], n_vectors = len(sample), len(vectors)
        save_npy(centroids_path, centroids)
    centroids = np.load(centroids_path)

    # 3-4. labels and region records, image by image
    (root / "pseudo").mkdir(exist_ok=True)
    labelled = lambda i: (state.records / f"{i}.npz").is_file()  # noqa: E731
    bar = tqdm(total=n_img, initial=sum(map(labelled, range(n_img))), desc="stage A: labels", unit="img",
               disable=not progress)
    # batches are windows of the image order, as an uninterrupted build forms them: a build killed inside one
    # embeds that window again whole on resume (a convolution may round differently with a batch's make-up)
    for start in range(0, n_img, bs):
        batch = range(start, min(start + bs, n_img))
        if all(map(labelled, batch)):
            continue
        images = [read_image(paths[i]) for i in batch]
        t = time.perf_counter()
        feats = embedder.canvas(images, spec["assign_size"])
        seconds["embed_assign"] += time.perf_counter() - t
        counts["embed_assign"] += len(batch)
        for i, image, f in zip(batch, images, feats):
            if not labelled(i):
                _label_image(root, state, spec, filters, embedder, centroids, ids[i], i, image, f, seconds, counts)
                bar.update(1)
    bar.close()

    # 5. per-cluster neighbour lists, then the index (last: its presence means "complete")
    t = time.perf_counter()
    regions, neighbours = _neighbours(state, spec, n_img, rng)
    seconds["neighbours"] += time.perf_counter() - t
    counts["neighbours"] = n_img
    save_npy(root / "regions.npy", regions)
    save_npy(root / "neighbours.npy", neighbours)
    save_npy(root / "centroids.npy", centroids)
    common = Path(os.path.commonpath([str(p.parent) for p in paths]))
    write_json(root / "index.json", {
        "version": INDEX_VERSION, "num_clusters": n_clu, "samples": ids, "image_root": str(common),
        "images": [str(p.relative_to(common)) for p in paths], "filters": filters, "regions": "regions.npy",
        "neighbours": "neighbours.npy", "centroids": "centroids.npy",
        "build": {**spec, "key": key, "images_count": n_img, "sample_count": int(len(sample))}})
    shutil.rmtree(state.dir)
    return {"root": str(root), "images": n_img, "regions": int(len(regions)), "reused": False,
            "kmeans_vectors": n_vectors, "seconds": seconds, "counts": counts}


def _sample_vectors(state, embedder, spec, paths, sample, seconds, counts, progress) -> np.ndarray:
    size, cap, bs = spec["size"], spec["vectors_per_image"], spec["batch_size"]
    cells = [valid_cells(resized_hw(image_size(paths[i])[::-1], size), embedder.stride) for i in sample]
    n_vec = [h * w if cap is None else min(cap, h * w) for h, w in cells]
    offsets = np.concatenate([[0], np.cumsum(n_vec)])
    path, done_path = state.dir / "vectors.npy", state.dir / "vectors.json"
    done = json.loads(done_path.read_text())["done"] if done_path.is_file() else 0
    shape = (int(offsets[-1]), embedder.channels)
    mm = np.lib.format.open_memmap(path, mode="r+" if done else "w+", dtype=np.float32, shape=shape)
    bar = tqdm(total=len(sample), initial=done, desc="stage A: k-means vectors", unit="img", disable=not progress)
    for start in range(done, len(sample), bs):
        batch = list(range(start, min(start + bs, len(sample))))
        images = [read_image(paths[sample[j]]) for j in batch]
        t = time.perf_counter()
        feats = embedder.canvas(images, size)
        seconds["embed_sample"] += time.perf_counter() - t
        counts["embed_sample"] += len(batch)
        for j, f in zip(batch, feats):
            v = f.reshape(f.shape[0], -1).T.numpy()
            if cap is not None and len(v) > cap:  # a seeded subset per image, independent of the batch
                v = v[np.sort(np.random.default_rng([spec["seed"], int(sample[j])]).choice(len(v), cap, replace=False))]
            mm[offsets[j]:offsets[j + 1]] = v
        mm.flush()
        write_json(done_path, {"done": batch[-1] + 1})
        bar.update(len(batch))
    bar.close()
    return mm  # faiss reads the file-backed array in place (a copy would hold it all in memory: ~30 GB at the
    # paper's 20,000 images of 2,048-d cells)


def run_kmeans(vectors: np.ndarray, n: int, kmeans: dict, seed: int) -> np.ndarray:
    """faiss k-means (Lloyd, L2) with a fixed seed; (n, C) float32 centroids."""
    import faiss
    if len(vectors) < n:
        raise DataError(f"k-means: {len(vectors)} vectors cannot make {n} clusters; sample more images "
                        f"(data.params.build.sample_images / vectors_per_image) or lower clusters")
    km = faiss.Kmeans(vectors.shape[1], n, niter=kmeans["niter"], seed=seed,
                      max_points_per_centroid=kmeans["max_points_per_centroid"], verbose=False)
    km.train(vectors)
    return np.ascontiguousarray(km.centroids, np.float32)


def _label_image(root, state, spec, filters, embedder, centroids, sid, i, image, feats, seconds, counts) -> None:
    hw = image.shape[:2]
    t = time.perf_counter()
    label = assign(feats, centroids, hw)
    seconds["assign"] += time.perf_counter() - t
    counts["assign"] += 1
    if spec["superpixels"] is not None:
        t = time.perf_counter()
        label = superpixel_vote(label, image, spec["clusters"], **spec["superpixels"])
        seconds["superpixels"] += time.perf_counter() - t
        counts["superpixels"] += 1
    t = time.perf_counter()
    write_png(root / "pseudo" / f"{sid}.png", label)
    kept = {c: n for c, n in span_filter(label, filters["span"]).items() if n >= filters["min_pixels"]}
    clusters = sorted(kept)
    seconds["regions"] += time.perf_counter() - t
    desc = np.zeros((0, embedder.channels), np.float32)
    if clusters:
        size = spec["descriptor_size"]
        t = time.perf_counter()
        if size != spec["assign_size"]:
            feats = embedder.original(image) if size is None else embedder.canvas([image], size)[0]
            counts["embed_descriptor"] += 1
        seconds["embed_descriptor"] += time.perf_counter() - t
        t = time.perf_counter()
        desc = masked_means(feats, label, clusters)
        seconds["regions"] += time.perf_counter() - t
    counts["regions"] += 1
    tmp = state.records / f"{i}.tmp.npz"
    np.savez(tmp, clusters=np.asarray(clusters, np.int64), pixels=np.asarray([kept[c] for c in clusters], np.int64),
             desc=desc)
    tmp.replace(state.records / f"{i}.npz")


def _neighbours(state, spec, n_img, rng) -> Tuple[np.ndarray, np.ndarray]:
    """(regions (R, 5) int64 [sample, cluster, pixels, start, count] sorted by (cluster, sample),
    neighbours int32 flat)."""
    per_cluster: Dict[int, list] = {}
    for i in range(n_img):
        with np.load(state.records / f"{i}.npz") as r:
            for c, n, d in zip(r["clusters"], r["pixels"], r["desc"]):
                per_cluster.setdefault(int(c), []).append((i, int(n), d))
    rows, flat, start = [], [], 0
    for c in sorted(per_cluster):
        regs = per_cluster[c]
        samples = np.array([s for s, _, _ in regs], np.int64)
        for (s, n, _), nb in zip(regs, neighbour_lists(np.stack([d for _, _, d in regs]), spec["neighbours"], rng)):
            rows.append((s, c, n, start, len(nb)))
            flat.append(samples[nb].astype(np.int32))  # int32 from the start: COCO's lists run to GBs
            start += len(nb)
    regions = np.array(rows, np.int64).reshape(-1, 5)
    neighbours = np.concatenate(flat) if flat else np.zeros(0, np.int32)
    return regions, neighbours


# ----------------------------------------------------------------------------------------- the engine hook
def ensure_pseudo_tasks(cfg: Config, progress: bool = True) -> Optional[dict]:
    """For one phase's config: build its pseudo tasks when it trains on ``dataset: pseudo`` with a
    ``data.params.build`` block and they are missing (reuse them when complete); None otherwise."""
    if cfg.data.dataset != "pseudo" or "build" not in (cfg.data.params or {}):
        return None
    return build_pseudo_tasks(cfg.data, cfg.device, progress)


def ensure_for_run(cfg: Config, progress: bool = True) -> List[dict]:
    """``ensure_pseudo_tasks`` for every phase of a run (the trainer's phase configs), in order."""
    phases = cfg.train.phases or [{}]
    out = []
    for phase in phases:
        sub = with_overrides(cfg, {"train.phases": [], **phase.get("config", {})}) if phase else cfg
        result = ensure_pseudo_tasks(sub, progress)
        if result is not None:
            out.append(result)
    return out
