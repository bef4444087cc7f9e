"""Where the engine meets fsskern.data: the training stream, the evaluation manifests, the loader.

Training episode ``g`` (a global index, see the trainer) is episode ``g % n`` of epoch ``g // n`` of
the fold's ``TrainEpisodes`` (n = its query images), so it is a pure function of (seed, g).
Evaluation manifests are written to ``out/manifests/`` with their sha256.
"""
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..data.datasets import build_source
from ..data.episodes import TrainEpisodes
from ..data.index import scan_labels, training_pools
from ..data.loader import EpisodeDataset, build_train_episodes, collate_episodes
from ..data.protocols import build_test_manifest, build_val_manifest, coverage, get_protocol
from ..data.transforms import TestTransform, from_config
from . import distributed as dist
from .config import Config, with_overrides


class EpisodeStream:
    """Training episodes by global index: ``stream[g] = episodes.episode(g // n, g % n)``."""

    def __init__(self, episodes: TrainEpisodes):
        self.episodes = episodes

    def __len__(self) -> int:
        return 2 ** 62  # unbounded: the sampler decides which indices are read

    def __getitem__(self, g: int):
        epoch, i = divmod(g, len(self.episodes))
        return self.episodes.episode(epoch, i)


def train_dataset(cfg: Config) -> EpisodeDataset:
    d = cfg.data
    source = build_source(d, "train")
    # the loader's episodes: the source's own way of drawing them (parsing k-way, pseudo-task neighbours)
    episodes, pools = build_train_episodes(d, source, d.fold, cfg.seed)
    return EpisodeDataset(source, EpisodeStream(episodes), from_config(d, train=True), True,
                          base=pools.base, novel=pools.novel)


def with_protocol_defaults(cfg: Config) -> Config:
    """``cfg`` with ``eval.episodes`` / ``eval.seeds`` left unset (None) filled in: on the test split the protocol's
    own for the dataset (pfenet on PASCAL: 5,000 episodes, seed 321; bam: 1,000 x 5 seeds), on the val split the
    trainer's (train.val_episodes, [seed]). Set ones are kept."""
    e = cfg.eval
    if e.episodes is not None and e.seeds is not None:
        return cfg
    if e.split == "test":
        own = get_protocol(e.protocol).describe(cfg.data.dataset)
        episodes, seeds = own["episodes"], own["seeds"]
    else:
        episodes, seeds = cfg.train.val_episodes, [cfg.seed]
    return with_overrides(cfg, {"eval.episodes": episodes if e.episodes is None else e.episodes,
                                "eval.seeds": list(seeds) if e.seeds is None else e.seeds})


def eval_dataset(cfg: Config, seed: int):
    """(EpisodeDataset, info) for ``cfg.eval.split``: ``test`` = the fold's novel classes under
    ``cfg.eval.protocol``; ``val`` = model selection, on the validation classes (``data.val_classes``) or
    held-out images of the base classes (``data.val_fraction``).
    The protocol fixes the query order, the resize rule and where the scores are taken (``eval.resize`` and
    ``eval.score_at`` replace them when set);
    ``data.test_size`` the size; ``eval.support_annotation`` whether supports come as masks or boxes
    (the same episodes either way)."""
    d, e = cfg.data, cfg.eval
    if e.split == "test":
        source = build_source(d, "test")
        stats = scan_labels(source)
        manifest = build_test_manifest(source, stats, d.fold, d.shots, d.ways, e.protocol, seed, e.episodes)
        _, classes = source.fold_classes(d.fold)
        # the run's episodes and seeds, not the protocol's defaults, which eval.* may override
        protocol = {**get_protocol(e.protocol).describe(d.dataset), "size": d.test_size, "episodes": e.episodes,
                    "seeds": list(e.seeds)}
        if e.resize is not None:
            protocol["resize"] = e.resize
        if e.score_at is not None:
            protocol["score_at"] = e.score_at
        transform = TestTransform(d.test_size, protocol["resize"], score_at=protocol["score_at"],
                                  antialias=protocol["antialias"])
        if protocol["resize"] == "original" and e.batch_size > 1 and dist.is_main():
            # images of different sizes are padded bottom/right to a common one: the crop restores the scores'
            # grid, but the network has seen the padding, so a prediction depends on its batch neighbours
            warnings.warn("eval.resize=original with eval.batch_size > 1: each query is padded to its batch's "
                          "largest image, which can move its prediction; eval.batch_size=1 scores each alone",
                          stacklevel=2)
        base = ()  # novel classes: no base_label
    else:
        source = build_source(d, "train")
        stats = scan_labels(source)
        pools = training_pools(source, stats, d.fold, d.train_policy, d.min_pixels, d.val_fraction,
                               d.val_classes or ())
        manifest = build_val_manifest(source, pools.val, d.fold, d.shots, d.ways, seed, e.episodes, stats.key)
        classes = manifest.meta["classes"]
        protocol = {"protocol": "val-balanced", "episodes": e.episodes, "resize": "pfenet", "size": d.test_size}
        transform = TestTransform(d.test_size, "pfenet")
        # held-out images: base_label, as in training (BAM's ensemble must not suppress the episode's own class);
        # held-out classes are novel to the model, as the test's are: none
        base = () if d.val_classes else pools.base
    protocol["support_annotation"] = e.support_annotation
    if e.support_annotation == "box":
        protocol["box_rule"] = source.box_rule()
    sha = manifest.sha256
    if dist.is_main():
        name = f"{e.split}-fold{d.fold}-{d.shots}shot-{d.ways}way-seed{seed}.json"
        manifest.save(Path(cfg.out) / "manifests" / name)
    info = {"protocol": protocol, "manifest_sha256": sha, "classes": list(classes),
            "coverage": coverage(manifest, list(classes), e.min_class_episodes)}
    return EpisodeDataset(source, manifest, transform, False, base=base,
                          support_boxes=e.support_annotation == "box"), info


def episode_loader(dataset, indices, batch_size: int, num_workers: int, seed: int,
                   device: torch.device = torch.device("cpu")) -> DataLoader:
    """Episodes ``indices`` in this order, in batches, pinned when they go to a GPU (a CPU run on a GPU machine
    then never creates a CUDA context). The worker seeds come from a generator of their own, never from torch's
    global RNG (which a resumed run must find as it was saved)."""
    return DataLoader(dataset, batch_size=batch_size, sampler=list(indices), num_workers=num_workers,
                      collate_fn=collate_episodes, generator=torch.Generator().manual_seed(seed),
                      pin_memory=device.type == "cuda")
