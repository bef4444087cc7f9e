"""Named evaluation protocols (engine-anchors c4/c5): episode counts, seeds, query order and the
test resize rule of each public codebase, plus a class-balanced one; test manifests built from
them; the per-class coverage report.

Query orders:
- ``list``: the test list in file order (images holding a novel class with >= min_pixels), repeated
  until N episodes; the class is drawn among the query's qualifying novel classes (``pfenet``).
  ``pfenet-compat``, ``bam``, ``cyctr`` and ``hdmnet`` draw it among *all* novel classes present, even
  under min_pixels, as their code does (the filter gates only list membership and support pools).
- ``pairs``: (image, class) pairs in file order, ``t % len`` (HSNet PASCAL/FSS-1000; an HSNet split
  file's own pairs when the list is one, and then a class's supports are the images the file lists with it,
  as HSNet's ``build_img_metadata_classwise``). Without HSNet's split files the pairs are every (image, novel
  class) of the list (min_pixels 1), more than HSNet's PASCAL files hold (their pairs are size-filtered).
- ``class_uniform``: class uniform, then query uniform (HSNet COCO, PANet).
- ``balanced``: classes in turn, each class's queries in a per-class random order without repeats
  until its images run out, so every class gets N / n_classes episodes.
- ``frozen``: POPNet's test pairs: for each class in the dataset's order, the first 10 unused
  query-pool images holding it, each paired with 15 of the first 150 unused support-pool images (fewer,
  the same for every class, where the pools cannot hold that: CCP's 511-image test half gives 1, and
  shorts 9 queries).
  A positive episode count keeps the first N pairs (a smoke check); 0 keeps all.

Episode counts are exact (PFENet's loop runs 5001/20001: ``range(N)`` here gives N)."""
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .episodes import EpisodeSpec, Manifest, episode_rng, key_seed, make_episode, manifest_meta
from .io import DataError
from .index import LabelStats, test_pool

BAM_SEEDS = (510, 365, 382, 322, 988)


@dataclass(frozen=True)
class Protocol:
    name: str
    episodes: Dict[str, int]           # per dataset; "default" for the others
    seeds: Tuple[int, ...]
    query_order: Dict[str, str]        # per dataset; "default"
    resize: str                        # pfenet | square | original (fsskern.data.transforms rules)
    size: Dict[str, int] = field(default_factory=dict)  # test size per dataset; "default"
    min_pixels: int = 2048
    quirk_query_class: bool = False    # pfenet-compat: query class among all novel classes present
    score_at: str = "original"         # original label size, or the input size (HSNet default, PANet)
    antialias: bool = True             # "square": PIL's antialiased bilinear (HSNet, PANet); False: cv2.resize
    notes: str = ""

    def get(self, table: dict, dataset: str):
        return table.get(dataset, table.get("default"))

    def describe(self, dataset: str) -> dict:
        """What every result file records about the protocol."""
        return {"protocol": self.name, "episodes": self.get(self.episodes, dataset), "seeds": list(self.seeds),
                "query_order": self.get(self.query_order, dataset), "resize": self.resize, "score_at": self.score_at,
                "size": self.get(self.size, dataset), "min_pixels": self.min_pixels,
                "quirk_query_class": self.quirk_query_class, "antialias": self.antialias}


_LIST = {"default": "list"}
PROTOCOLS: Dict[str, Protocol] = {p.name: p for p in [
    Protocol("pfenet", {"pascal": 5000, "coco": 20000, "default": 1000}, (321,), _LIST, "pfenet",
             {"coco": 641, "default": 473}, notes="PFENet runs 5001/20001; exact counts here"),
    Protocol("pfenet-compat", {"pascal": 5000, "coco": 20000, "default": 1000}, (321,), _LIST, "pfenet",
             {"coco": 641, "default": 473}, quirk_query_class=True, notes="query class among all novel classes"),
    Protocol("cyctr", {"pascal": 1000, "coco": 5000, "default": 1000}, (123,), _LIST, "pfenet", {"default": 473},
             quirk_query_class=True,  # CyCTR's util/dataset.py draws it as PFENet's does
             notes="query class among all novel classes present; the code's COCO configs seed 321 (PASCAL 123)"),
    Protocol("bam", {"default": 1000}, BAM_SEEDS, _LIST, "pfenet", {"coco": 641, "default": 473},
             quirk_query_class=True,  # BAM's util/dataset.py draws it among every novel class present, as PFENet
             notes="report the mean over seeds, not the best; query class among all novel classes present"),
    Protocol("hdmnet", {"pascal": 1000, "coco": 10000, "default": 1000}, BAM_SEEDS + (98, 742, 17, 595, 106), _LIST,
             "square", {"coco": 633, "default": 473}, quirk_query_class=True, antialias=False,
             notes="resized_val: the image squashed to S x S (cv2.resize), logits scored at the original size; "
                   "query class among all novel classes present (BAM's dataset code)"),
    Protocol("hsnet", {"fss1000": 2400, "default": 1000}, (0,), {"coco": "class_uniform", "default": "pairs"},
             "square", {"default": 400}, min_pixels=1, score_at="input", notes="no size filter (HSNet)"),
    Protocol("panet", {"default": 1000}, (1234, 1235, 1236, 1237, 1238), {"default": "class_uniform"}, "square",
             {"default": 417}, min_pixels=1, score_at="input",
             notes="mean +- std over 5 runs; no size filter; PANet's code draws its test episodes from "
                   "its training list (VOC trainaug, COCO train), here from the test split unless "
                   "data.val_list names that list"),
    Protocol("popnet", {"default": 0}, (0,), {"default": "frozen"}, "square", {"default": 512}, min_pixels=1,
             notes="frozen pairs: 10 queries x 15 supports per class; no size filter; resized to 512 (paper; "
                   "the code tests at native size: eval.resize=original), scored at the original size"),
    Protocol("balanced", {"coco": 4000, "default": 1000}, (0, 1, 2, 3, 4), {"default": "balanced"}, "pfenet",
             {"coco": 641, "default": 473}, notes="class-balanced queries; mean +- std over 5 seeds"),
]}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise DataError(f"unknown protocol {name!r}; expected one of {sorted(PROTOCOLS)}")
    return PROTOCOLS[name]


def build_test_manifest(source, stats: LabelStats, fold: int, shots: int, ways: int, protocol: str, seed: int,
                        episodes: Optional[int] = None) -> Manifest:
    """The test episodes of (source, fold, shots, ways, protocol, seed): a pure function of them and
    of the label index (``stats.key`` is recorded in the manifest)."""
    proto = get_protocol(protocol)
    order = proto.get(proto.query_order, source.name)
    n = episodes if episodes is not None else proto.get(proto.episodes, source.name)
    meta = manifest_meta(source, fold, shots, ways, protocol, seed, stats.key, query_order=order)
    if order == "frozen":
        pairs = popnet_pairs(source, stats, fold, shots, ways, meta)
        return Manifest(meta, pairs[:n] if n > 0 else pairs)
    novel, pools = test_pool(source, stats, fold, proto.min_pixels)
    if ways > len(novel):
        raise DataError(f"{ways}-way episodes need {ways} novel classes; fold {fold} has {len(novel)}")
    if n <= 0:
        raise DataError(f"protocol {protocol!r} needs a positive episode count, not {n}")
    qualifying = {i: [c for c in novel if stats.pixels[i].get(c, 0) >= proto.min_pixels] for i in range(len(source))}
    queries = [i for i in range(len(source)) if qualifying[i]]
    pairs = [(i, c) for i in queries for c in qualifying[i]]
    if order == "pairs" and getattr(source, "listed_pairs", None):
        pairs = [(i, c) for i, c in source.listed_pairs if c in novel]
        if not pairs:
            raise DataError(f"{source.name} {source.split}: its list names no (image, class) pair of fold {fold}'s "
                            f"novel classes {novel}: is it another fold's list?")
        # HSNet's build_img_metadata_classwise: a class's supports are the file's images listed with it
        pools = {c: sorted({i for i, pc in pairs if pc == c}) for c in novel}
    mk = key_seed(meta)  # hash the key once; episode t then hashes (mk, t)
    per_class_order = {c: episode_rng(mk, "class", c).permutation(len(pools[c])) for c in novel}
    out = []
    for t in range(n):
        rng = episode_rng(mk, t)
        if order == "list":
            q = queries[t % len(queries)]
            choices = [c for c in novel if c in stats.pixels[q]] if proto.quirk_query_class else qualifying[q]
            cls = choices[int(rng.integers(len(choices)))]
        elif order == "pairs":
            q, cls = pairs[t % len(pairs)]
        elif order == "class_uniform":
            cls = novel[int(rng.integers(len(novel)))]
            q = pools[cls][int(rng.integers(len(pools[cls])))]
        elif order == "balanced":
            cls = novel[t % len(novel)]
            q = pools[cls][int(per_class_order[cls][(t // len(novel)) % len(pools[cls])])]
        else:
            raise DataError(f"unknown query order {order!r}")
        classes = [cls] + [novel[int(k)] for k in rng.choice(
            [j for j, c in enumerate(novel) if c != cls], ways - 1, replace=False)] if ways > 1 else [cls]
        support_pools = {c: pools.get(c, []) for c in classes}
        out.append(make_episode(rng, q, classes, support_pools, shots, key_seed(mk, t, "aug")))
    return Manifest(meta, out)


def popnet_pairs(source, stats: LabelStats, fold: int, shots: int, ways: int, meta: dict,
                 queries_per_class: int = 10, supports_per_query: int = 15) -> List[EpisodeSpec]:
    """POPNet's frozen test pairs (code, ``oshp_loader.py``): k-way episodes carry every foreground
    class of the dataset (base and novel: all are evaluated); one-way episodes the listed class.
    Every image is used once, so a small dataset runs out of fresh supports for the later classes: then
    the largest count under ``supports_per_query`` that every class can have is used, with a warning.
    Where not even one support per query fits (rare classes late in the order, e.g. VITON's shoes), one
    support per query is kept and such a class gets as many queries as its fresh supports allow, none if
    it has no fresh support left; the warning names those classes. A class that no image of the pools
    holds (LIP's hat on VITON) gets no pairs of its own either. k-way episodes still list every class, as
    each can be predicted."""
    query_pool = getattr(source, "query_pool", range(len(source)))
    support_pool = getattr(source, "support_pool", range(len(source)))
    held = {c for i in (*query_pool, *support_pool) for c in stats.pixels[i]}
    order = getattr(source, "test_class_order", source.foreground_classes())
    absent = [c for c in order if c not in held]
    if absent:
        warnings.warn("POPNet pairs: no image holds " + ", ".join(f"{c} ({source.class_names[c]})" for c in absent)
                      + "; those classes get no pairs of their own")
    order = [c for c in order if c in held]
    for per in range(supports_per_query, 0, -1):
        try:
            pairs = _frozen_pairs(source, stats, order, shots, ways, meta, queries_per_class, per)
        except DataError:
            continue
        if per < supports_per_query:
            warnings.warn(f"POPNet pairs: {per} supports per query, not {supports_per_query} "
                          f"(the support pool cannot hold {supports_per_query} fresh images per query for every class)")
        return pairs
    short: Dict[int, int] = {}
    pairs = _frozen_pairs(source, stats, order, shots, ways, meta, queries_per_class, 1, short)
    warnings.warn("POPNet pairs: 1 support per query, and too few fresh images for " + ", ".join(
        f"{c} ({source.class_names[c]}): {k} queries" for c, k in short.items()))
    return pairs


def _frozen_pairs(source, stats: LabelStats, order: List[int], shots: int, ways: int, meta: dict,
                  queries_per_class: int, supports_per_query: int,
                  short: Optional[Dict[int, int]] = None) -> List[EpisodeSpec]:
    """Raises DataError when a class cannot have its pairs; with ``short`` (a dict to fill) such a class keeps
    the queries its fresh supports cover instead (maybe none), recorded as short[class] = queries."""
    query_pool = getattr(source, "query_pool", range(len(source)))
    support_pool = getattr(source, "support_pool", range(len(source)))
    all_classes = tuple(source.foreground_classes())
    used, out = set(), []
    def fresh_supports(c, qs):
        need = len(qs) * supports_per_query * shots
        return need, [i for i in support_pool if c in stats.pixels[i] and i not in used and i not in qs][:need]

    for c in order:
        qs = [i for i in query_pool if c in stats.pixels[i] and i not in used][:queries_per_class]
        need, ss = fresh_supports(c, qs)
        if short is not None and (not qs or len(ss) < need):
            # the most queries whose fresh supports fit, one query fewer at a time: where the pools overlap
            # (a folder of parsing images) a query let go becomes a support (cutting qs to len(ss) // per once
            # dropped those images altogether: 8 fresh images, 1 shot, made no pair instead of 4)
            while qs and len(ss) < need:
                qs = qs[:-1]
                need, ss = fresh_supports(c, qs)
            short[c] = len(qs)
        used.update(qs)
        used.update(ss)
        if short is None and (not qs or len(ss) < need):
            raise DataError(f"POPNet pairs: class {c} ({source.class_names[c]}) has {len(qs)} query and {len(ss)} "
                            f"support images; needs {queries_per_class} and {need}")
        for k, q in enumerate(qs):
            for j in range(supports_per_query):
                t = len(out)
                shot = ss[(k * supports_per_query + j) * shots:(k * supports_per_query + j + 1) * shots]
                classes = all_classes if ways > 1 else (c,)
                out.append(EpisodeSpec(q, classes, tuple(s for _ in classes for s in shot), key_seed(meta, t, "aug")))
    return out


def build_val_manifest(source, pools: Dict[int, List[int]], fold: int, shots: int, ways: int, seed: int,
                       episodes: int, index_key: str) -> Manifest:
    """Model-selection episodes on the held-out images or classes (``TrainingPools.val``): class-balanced,
    queries and supports both from the held-out images, so no test class or test image is touched."""
    usable = sorted(c for c, p in pools.items() if len(p) >= shots + 1)
    if len(usable) < ways:
        raise DataError(f"validation split: {len(usable)} classes have >= {shots + 1} held-out images, {ways} "
                        f"way(s) need as many; raise data.val_fraction or add data.val_classes")
    meta = manifest_meta(source, fold, shots, ways, "val-balanced", seed, index_key, classes=usable)
    out = []
    for t in range(episodes):
        rng = episode_rng(meta, t)
        cls = usable[t % len(usable)]
        q = pools[cls][int(rng.integers(len(pools[cls])))]
        classes = [cls] + [usable[int(k)] for k in rng.choice(
            [j for j, c in enumerate(usable) if c != cls], ways - 1, replace=False)] if ways > 1 else [cls]
        out.append(make_episode(rng, q, classes, pools, shots, key_seed(meta, t, "aug")))
    return Manifest(meta, out)


def coverage(manifest: Manifest, classes: Optional[List[int]] = None, min_class_episodes: int = 0) -> Dict[int, int]:
    """{class: episodes it appears in (as any way)}; warns for each class under ``min_class_episodes``
    (a class never sampled would score 0 or be missing: HDMNet#15, BAM#42)."""
    counts = {c: 0 for c in (classes or [])}
    for e in manifest.episodes:
        for c in set(e.classes):
            counts[c] = counts.get(c, 0) + 1
    low = {c: n for c, n in counts.items() if n < min_class_episodes}
    if low:
        warnings.warn(f"manifest {manifest.meta.get('protocol')} seed {manifest.meta.get('seed')}: classes with fewer "
                      f"than {min_class_episodes} episodes: {low}")
    return dict(sorted(counts.items()))


__all__ = ["Protocol", "PROTOCOLS", "get_protocol", "build_test_manifest", "build_val_manifest", "coverage",
           "popnet_pairs"]
