"""Episodes as pure functions of their key: every random draw of episode ``t`` comes from a
``numpy.random.Generator(PCG64)`` seeded by the sha256 of (dataset, split, fold, shots, ways,
protocol, seed, index key, t) -- never from a global RNG, a worker's RNG or the loading order. So a
manifest is identical for any ``num_workers``, DDP world size or order of loading (unlike the
PFENet family, whose test episodes change with the worker count: pytorch/pytorch#15170).

Test manifests are lists of ``EpisodeSpec`` written to disk as JSON with their sha256; training
episodes are computed on demand from (seed, epoch, index) by ``TrainEpisodes``."""
import hashlib
import json
import warnings
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .io import DataError


@dataclass(frozen=True)
class EpisodeSpec:
    query: int                    # sample index
    classes: Tuple[int, ...]      # 1 class (1-way) or n (k-way), dataset class ids
    supports: Tuple[int, ...]     # K sample indices per way, flattened way-major; never the query
    seed: int                     # seeds this episode's augmentation


def key_seed(*key) -> int:
    """A 63-bit seed from the sha256 of a JSON-able key (stable across processes and machines)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def episode_rng(*key) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(key_seed(*key)))


def others_in(pool: Sequence[int], query: int) -> Tuple[int, int]:
    """(samples of the ascending ``pool`` other than the query, the query's position or -1)."""
    pos = bisect_left(pool, query)
    found = pos < len(pool) and pool[pos] == query
    return len(pool) - found, (pos if found else -1)


def draw_supports(rng: np.random.Generator, pool: Sequence[int], query: int, shots: int, cls: int) -> List[int]:
    """``shots`` distinct samples of ``pool`` (ascending sample indices), none equal to the query; no
    copy of the pool is made (COCO pools hold tens of thousands of images)."""
    n, pos = others_in(pool, query)
    if n < shots:
        raise DataError(f"class {cls} has {len(pool)} qualifying image(s); {shots}-shot episodes need at least "
                        f"{shots + 1} (query + {shots} supports)")
    picks = rng.choice(n, size=shots, replace=False)
    return [pool[int(p) + (0 <= pos <= p)] for p in picks]


def make_episode(rng, query: int, classes: Sequence[int], pools: Dict[int, Sequence[int]], shots: int,
                 seed: int) -> EpisodeSpec:
    supports = [s for c in classes for s in draw_supports(rng, pools[c], query, shots, c)]
    return EpisodeSpec(int(query), tuple(int(c) for c in classes), tuple(int(s) for s in supports), int(seed))


class Manifest:
    """A fixed list of episodes with the key that produced it (``meta``)."""

    def __init__(self, meta: dict, episodes: List[EpisodeSpec]):
        self.meta = dict(meta)
        self.episodes = list(episodes)

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, i: int) -> EpisodeSpec:
        return self.episodes[i]

    def _payload(self) -> dict:
        return {"meta": self.meta, "episodes": [[e.query, list(e.classes), list(e.supports), e.seed]
                                                 for e in self.episodes]}

    @property
    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self._payload(), sort_keys=True).encode()).hexdigest()

    def save(self, path) -> str:
        """Write JSON (meta, episodes, sha256); returns the sha256."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        sha = self.sha256
        path.write_text(json.dumps({**self._payload(), "sha256": sha}, sort_keys=True))
        return sha

    @classmethod
    def load(cls, path) -> "Manifest":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"missing manifest file: {path}")
        data = json.loads(path.read_text())
        m = cls(data["meta"], [EpisodeSpec(q, tuple(c), tuple(s), seed) for q, c, s, seed in data["episodes"]])
        if m.sha256 != data.get("sha256"):
            raise DataError(f"manifest {path} does not match its sha256 (edited or corrupt)")
        return m


class TrainEpisodes:
    """Training episodes from (seed, epoch, index), PFENet-style: an epoch visits every query image
    once in an order drawn from (key, epoch); episode i's class is drawn uniformly among the query's
    qualifying classes and its supports among the other images of that class. With ``ways`` > 1 the
    other ways are drawn from the remaining classes. ``support_pools`` (default: ``pools``) lets a
    dataset keep queries and supports apart (POPNet's query/support pools).

    Classes with fewer than ``shots + 1`` images cannot make an episode; they are left out of the
    query classes and listed in ``excluded`` (with a warning), never dropped silently."""

    def __init__(self, pools: Dict[int, Sequence[int]], key: dict, shots: int = 1, ways: int = 1,
                 support_pools: Optional[Dict[int, Sequence[int]]] = None):
        self.key, self.shots, self.ways = key_seed(key), shots, ways  # the key hashed once
        pools = {c: sorted(p) for c, p in pools.items()}  # draw_supports bisects
        self.support_pools = {c: sorted(p) for c, p in (support_pools if support_pools is not None else pools).items()}
        self.excluded = sorted(c for c in pools if self._supports_short(pools[c], self.support_pools.get(c, ()), shots))
        if self.excluded:
            warnings.warn(f"training episodes: classes {self.excluded} have fewer than {shots + 1} images and are "
                          f"never sampled")
        usable = {c: p for c, p in pools.items() if c not in self.excluded}
        if len(usable) < ways:
            raise DataError(f"training needs {ways} class(es) with >= {shots + 1} images; usable: {sorted(usable)}")
        by_query: Dict[int, List[int]] = {}
        for c, pool in usable.items():
            for i in pool:
                by_query.setdefault(i, []).append(c)
        self.queries = sorted(by_query)
        self.query_classes = [sorted(by_query[q]) for q in self.queries]
        self.classes = sorted(usable)
        self.epoch = 0
        self._order: Tuple[int, Optional[np.ndarray]] = (-1, None)

    @staticmethod
    def _supports_short(queries: Sequence[int], supports: Sequence[int], shots: int) -> bool:
        """True when some query of the class would find fewer than ``shots`` supports other than itself."""
        s = set(supports)
        return len(s) - (1 if s.intersection(queries) else 0) < shots

    def __len__(self) -> int:
        return len(self.queries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> np.ndarray:
        if self._order[0] != epoch:
            self._order = (epoch, episode_rng(self.key, "order", epoch).permutation(len(self.queries)))
        return self._order[1]

    def episode(self, epoch: int, i: int) -> EpisodeSpec:
        slot = int(self.order(epoch)[i])
        q = self.queries[slot]
        rng = episode_rng(self.key, epoch, i)
        for _ in range(100):  # a query may be the only support candidate of its class; redraw the class
            cls = [self.query_classes[slot][int(rng.integers(len(self.query_classes[slot])))]]
            others = [c for c in self.classes if c != cls[0]]
            if self.ways > 1:
                cls += [others[int(k)] for k in rng.choice(len(others), self.ways - 1, replace=False)]
            if all(others_in(self.support_pools[c], q)[0] >= self.shots for c in cls):
                return make_episode(rng, q, cls, self.support_pools, self.shots, key_seed(self.key, epoch, i, "aug"))
        raise DataError(f"no class of query sample {q} has {self.shots} support image(s) other than the query")

    def __getitem__(self, i: int) -> EpisodeSpec:
        return self.episode(self.epoch, i)


def manifest_meta(source, fold: int, shots: int, ways: int, protocol: str, seed: int, index_key: str, **extra) -> dict:
    return {"dataset": source.name, "split": source.split, "fold": fold, "shots": shots, "ways": ways,
            "protocol": protocol, "seed": seed, "index": index_key, "samples": len(source), **extra}


class KWayTrainEpisodes:
    """POPNet k-way training episodes (code: ``oshp_loader.py``): a query from the query pool, ``shots``
    support images from the support pool, every listed class a way (the support is annotated with all
    of them; a class the support lacks becomes background in the query, see ``EpisodeDataset``).
    Drawn per (seed, epoch, index), not once at start-up as the code does."""

    def __init__(self, query_pool: Sequence[int], support_pool: Sequence[int], classes: Sequence[int], key: dict,
                 shots: int = 1):
        if len(support_pool) < shots + 1:
            raise DataError(f"k-way episodes need >= {shots + 1} support-pool images, not {len(support_pool)}")
        if not query_pool:
            raise DataError("k-way episodes need a non-empty query pool")
        self.queries, self.support_pool = list(query_pool), sorted(support_pool)
        self.classes, self.key, self.shots, self.epoch = tuple(classes), key_seed(key), shots, 0

    def __len__(self) -> int:
        return len(self.queries)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def episode(self, epoch: int, i: int) -> EpisodeSpec:
        q = self.queries[int(episode_rng(self.key, "order", epoch).permutation(len(self.queries))[i])]
        rng = episode_rng(self.key, epoch, i)
        shot = draw_supports(rng, self.support_pool, q, self.shots, -1)
        return EpisodeSpec(q, self.classes, tuple(s for _ in self.classes for s in shot),
                           key_seed(self.key, epoch, i, "aug"))

    def __getitem__(self, i: int) -> EpisodeSpec:
        return self.episode(self.epoch, i)


def parsing_train_episodes(source, pools: Dict[int, List[int]], key: dict, shots: int = 1, ways: int = 1):
    """Training episodes of a parsing source: k-way (``ways`` > 1: all base classes, one annotated
    support) or one-way (class episodes with queries from the query pool and supports from the support
    pool). ``pools``: ``TrainingPools.train`` (base classes only)."""
    qset, sset = set(source.query_pool), set(source.support_pool)
    if ways > 1:
        kept = {i for p in pools.values() for i in p}
        return KWayTrainEpisodes([i for i in source.query_pool if i in kept],
                                 [i for i in source.support_pool if i in kept], sorted(pools), key, shots)
    return TrainEpisodes({c: [i for i in p if i in qset] for c, p in pools.items()}, key, shots, 1,
                         support_pools={c: [i for i in p if i in sset] for c, p in pools.items()})
