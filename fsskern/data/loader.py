"""Episodes -> tensors: ``EpisodeDataset`` builds one episode dict (docs/architecture.md "Episode
batch") and ``collate_episodes`` stacks them. Augmentation draws only from a ``torch.Generator``
seeded with the episode's own seed, so an episode's tensors are identical for any ``num_workers``,
sampler or loading order.

Labels of an episode (PFENet conventions): the query mask holds way w's class as w + 1, 0 elsewhere,
255 kept; a support mask is 1 on its way's class, 0 elsewhere, 255 kept. In training, novel-class
pixels are background (PFENet policy; the bam policy has no such image) and ``base_label`` is the
query label in the base-learner space. A way whose supports hold no pixel of its class is background
in the query (POPNet: the query is parsed into the classes the support annotates). A parsing source
with ``data.hierarchy`` adds ``query_areas`` (B, H, W) and ``support_areas`` (B, S, H, W) int64: the
labels in area ids (0 bg, 1..n areas, 255 ignore) for POPNet's stage 2, and ``query_human`` /
``support_human`` (0 bg, 1 person, 255 ignore) from the raw labels, novel classes included, for its stage 1
(POPNet notes A2: the person is every labelled pixel, as the public code builds it).

Box supports (``support_boxes=True``; the weakly supervised setting of CANet and CRCNet Tab. 14): each
support mask is the union of the tight boxes of its class's instances (``Source.instance_boxes``), drawn
at the original resolution before the transform; the query and its label are untouched, so queries
are scored exactly as in the mask setting."""
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as nnf
from torch.utils.data import DataLoader, Dataset, Sampler

from . import transforms as T
from .datasets import IGNORE, build_source
from .datasets.base import box_mask
from .index import base_label_lut, training_base
from .io import DataError


def mirrored_classes(class_names) -> List[tuple]:
    """(left, right) class-name pairs a source keeps apart (LIP's left-arm / right-arm, ATR's left-shoe ...)."""
    names = {str(n).lower() for n in class_names if n}
    return sorted((n, "right" + n[4:]) for n in names if n.startswith("left") and "right" + n[4:] in names)


def way_lut(classes: Sequence[int], size: int = 256) -> np.ndarray:
    lut = np.zeros(size, dtype=np.int64)
    for w, c in enumerate(classes, start=1):
        lut[c] = w
    lut[IGNORE] = IGNORE
    return lut


class EpisodeDataset(Dataset):
    """``dataset[t]`` -> the episode dict of ``manifest[t]`` (a ``Manifest`` or ``TrainEpisodes``).

    ``train``: ``transform`` is a ``TrainTransform`` (called with the episode's generator) and
    ``novel`` / ``base`` give the training label rules (``base`` alone: ``base_label`` on validation episodes
    too); otherwise a ``TestTransform`` and the dict
    also carries ``query_label_orig`` and ``restore``. ``support_boxes``: box annotations in place of
    the support masks (module docstring)."""

    def __init__(self, source, manifest, transform, train: bool, base: Sequence[int] = (), novel: Sequence[int] = (),
                 support_boxes: bool = False):
        self.source, self.manifest, self.transform, self.train = source, manifest, transform, train
        self.support_boxes = support_boxes
        self.size = max(256, len(source.class_names))
        # label rules are composed as lookup tables (256+ entries) and applied to each label in one pass
        self.pre = np.arange(self.size, dtype=np.int64)
        if train:
            self.pre[list(novel)] = 0  # PFENet policy: novel pixels are background in training
        self.base_lut = None
        if base:  # training, and validation on base classes (the episode's class in the base learner's space)
            self.base_lut = base_label_lut(source.base_learner_classes(base), self.size)[self.pre]
        areas = getattr(source, "area_lut", None)
        self.areas = None
        if areas is not None:
            self.areas = np.zeros(self.size, dtype=np.int64)
            self.areas[:len(areas)] = areas
            self.areas = self.areas[self.pre]
        mirrored = mirrored_classes(source.class_names)
        if train and getattr(transform, "flip", False) and mirrored:
            # cv2.flip moves the pixels, not the ids: a left arm would come out on the right side, still "left"
            raise DataError(f"{source.name}: a horizontal flip (data.augment.flip) would mislabel the left/right "
                            f"classes {mirrored}; merge each pair (data.merge, as the LIP/ATR/CIHP presets do) or set "
                            "data.augment.flip=false")
        if support_boxes and self.areas is not None:
            raise DataError("box supports are not defined for parsing sources (data.hierarchy): their support "
                            "areas and person maps would still come from the full labels")

    def __len__(self) -> int:
        return len(self.manifest)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.manifest, "set_epoch"):
            self.manifest.set_epoch(epoch)

    def __getitem__(self, t: int) -> Dict:
        e = self.manifest[t]
        ways, shots = len(e.classes), len(e.supports) // len(e.classes)
        gen = torch.Generator().manual_seed(e.seed)
        # each image decoded once; parsing sources add the stage-1 person mask from the raw label (novel kept)
        load = self.source.load_with_person if self.areas is not None else self.source.load
        supports = {s: load(s) for s in dict.fromkeys(e.supports)}
        masks = []  # (way, shot) -> binary mask at the original resolution
        for w, c in enumerate(e.classes):
            binary = np.zeros(self.size, dtype=np.int64)
            binary[c], binary[IGNORE] = 1, IGNORE
            binary = binary[self.pre]
            for s in e.supports[w * shots:(w + 1) * shots]:
                label = supports[s][1]
                masks.append(box_mask(label.shape, self.source.instance_boxes(s, self.pre[label], c))
                             if self.support_boxes else binary[label])
        q_image, q_label, *q_person = load(e.query)
        lut = way_lut(e.classes, self.size)
        for w in range(ways):  # no support pixel of this way: nothing to segment it from
            if not any((m == 1).any() for m in masks[w * shots:(w + 1) * shots]):
                lut[e.classes[w]] = 0
        q_mask = lut[self.pre][q_label]
        q_extra = []
        if self.base_lut is not None:
            q_extra.append(self.base_lut[q_label])
        if self.areas is not None:
            q_extra += [q_person[0], self.areas[q_label]]
        out = {"classes": torch.tensor(e.classes, dtype=torch.int64), "index": torch.tensor(t, dtype=torch.int64)}
        if self.train:
            img, labels = self.transform(q_image, [q_mask] + q_extra, gen)
        else:
            img, labels, restore = self.transform(q_image, [q_mask] + q_extra)
            out["query_label_orig"] = torch.from_numpy(q_mask)
            out["restore"] = restore
        out["query_img"], out["query_mask"] = img, labels[0]
        if self.base_lut is not None:
            out["base_label"] = labels[1]
        if self.areas is not None:
            out["query_human"], out["query_areas"] = labels[-2], labels[-1]
        s_imgs: List[Optional[torch.Tensor]] = [None] * len(masks)
        s_masks: List[Optional[torch.Tensor]] = [None] * len(masks)
        s_areas: List[Optional[torch.Tensor]] = [None] * len(masks)
        s_human: List[Optional[torch.Tensor]] = [None] * len(masks)
        for s, (image, label, *person) in supports.items():
            slots = [j for j, sj in enumerate(e.supports) if sj == s]  # one transform per image, all its ways
            extra = [person[0], self.areas[label]] if self.areas is not None else []
            planes = [masks[j] for j in slots]
            # the training crop keeps the foreground of its first plane: for an image several ways share,
            # that is the union of their masks (dropped after the transform), not the first way's class alone
            lead = [np.any([m == 1 for m in planes], axis=0).astype(np.int64)] if len(slots) > 1 else []
            if self.train:
                img, labels = self.transform(image, lead + planes + extra, gen)
            else:
                img, labels, _ = self.transform(image, lead + planes + extra)
            labels = labels[len(lead):]
            for n, j in enumerate(slots):
                s_imgs[j], s_masks[j] = img, labels[n]
                if extra:
                    s_human[j], s_areas[j] = labels[-2], labels[-1]
        out["support_imgs"], out["support_masks"] = _stack(s_imgs, 0.0), _stack(s_masks, IGNORE)
        if self.areas is not None:
            out["support_human"], out["support_areas"] = _stack(s_human, IGNORE), _stack(s_areas, IGNORE)
        return out


def _pad_to(x: torch.Tensor, h: int, w: int, value) -> torch.Tensor:
    dh, dw = h - x.shape[-2], w - x.shape[-1]
    return nnf.pad(x, (0, dw, 0, dh), value=value) if dh or dw else x


def _stack(xs: List[torch.Tensor], value) -> torch.Tensor:
    if len(xs) == 1:
        return xs[0].unsqueeze(0)  # a view: one 1-shot support image is not copied
    h = max(x.shape[-2] for x in xs)
    w = max(x.shape[-1] for x in xs)
    return torch.stack([_pad_to(x, h, w, value) for x in xs])


def collate_episodes(batch: List[Dict]) -> Dict:
    """Stack episode dicts; images of different sizes (``original`` test rule) are padded bottom/right
    to the batch maximum with 0 (images) and 255 (labels); ``query_label_orig`` and ``restore`` stay
    lists (one original-size label and restore dict per episode)."""
    out = {}
    for k in batch[0]:
        xs = [b[k] for b in batch]
        if k in ("query_label_orig", "restore"):
            out[k] = xs
        elif k in ("query_img", "support_imgs"):
            out[k] = _stack(xs, 0.0)
        elif k in ("classes", "index"):
            out[k] = torch.stack(xs)
        else:
            out[k] = _stack(xs, IGNORE)
    return out


class ShardSampler(Sampler):
    """Evaluation sharding without padding: rank r gets indices r, r + world, ... so the shards are
    disjoint and their union is the whole manifest (DistributedSampler pads with repeats, which would
    count some episodes twice in summed I/U)."""

    def __init__(self, n: int, rank: int, world_size: int):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} out of range for world size {world_size}")
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def test_transform_for(cfg_data, protocol: Optional[str]):
    """The protocol's resize rule and size (``data.test_size`` when the protocol names none)."""
    if not protocol or protocol.startswith("val"):
        return T.from_config(cfg_data, train=False)
    from .protocols import get_protocol
    p = get_protocol(protocol)
    size = p.get(p.size, cfg_data.dataset) or cfg_data.test_size
    return T.TestTransform(size, p.resize, score_at=p.score_at, antialias=p.antialias)


def build_train_episodes(cfg_data, source, fold: int, seed: int, cache_dir=None, on_error: str = "raise"):
    """(training episodes, TrainingPools) for ``cfg_data``: the class index, the training policy, the
    held-out validation images or classes, and the source's episodes (PFENet-style, POPNet parsing, UMTFSS neighbour
    supports: ``Source.train_episodes``) keyed by
    (dataset, fold, shots, ways, seed, index); call ``set_epoch`` on the loader's dataset each epoch."""
    from .index import scan_labels, training_pools
    stats = scan_labels(source, cache_dir, on_error)
    pools = training_pools(source, stats, fold, cfg_data.train_policy, cfg_data.min_pixels, cfg_data.val_fraction,
                           getattr(cfg_data, "val_classes", None) or ())
    key = {"dataset": source.name, "fold": fold, "shots": cfg_data.shots, "ways": cfg_data.ways, "seed": seed,
           "index": stats.key, "policy": cfg_data.train_policy, "min_pixels": cfg_data.min_pixels}
    return source.train_episodes(pools.train, key, cfg_data.shots, cfg_data.ways), pools


def build_loader(cfg_data, split: str, fold: int, manifest, train: bool, sampler: Optional[Sampler] = None,
                 source=None, batch_size: Optional[int] = None) -> DataLoader:
    """A DataLoader of episode batches. ``manifest``: ``TrainEpisodes`` (training) or ``Manifest``.
    ``sampler``: ``DistributedSampler(dataset, shuffle=False)`` in training (the episodes already come
    in a per-epoch order) or ``ShardSampler`` in evaluation. The test resize rule and size come from
    the manifest's protocol."""
    source = source or build_source(cfg_data, split)
    if train:
        base, novel = source.fold_classes(fold)
        base = training_base(base, getattr(cfg_data, "val_classes", None) or ())
        transform = T.from_config(cfg_data, train=True)
        dataset = EpisodeDataset(source, manifest, transform, True, base=base, novel=novel)
    else:
        transform = test_transform_for(cfg_data, getattr(manifest, "meta", {}).get("protocol"))
        dataset = EpisodeDataset(source, manifest, transform, False)
    workers = cfg_data.num_workers
    # a persistent worker keeps the dataset it was forked with, so set_epoch would never reach it: training
    # loaders fork fresh workers each epoch (the engine's own loader carries the epoch in the index instead)
    return DataLoader(dataset, batch_size=batch_size or cfg_data.batch_size, shuffle=False, sampler=sampler,
                      num_workers=workers, collate_fn=collate_episodes, drop_last=train,
                      persistent_workers=workers > 0 and not train, pin_memory=torch.cuda.is_available())
