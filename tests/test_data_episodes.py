"""Episode manifests, protocols and the loader: pure functions of their key, identical for any worker
count, world size or loading order; exact episode counts; supports never equal the query."""
import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fsskern.data import DataError, build_source
from fsskern.data.episodes import Manifest, TrainEpisodes
from fsskern.data.index import LabelStats, scan_labels, training_pools
from fsskern.data.loader import EpisodeDataset, ShardSampler, build_loader, collate_episodes
from fsskern.data.protocols import PROTOCOLS, build_test_manifest, build_val_manifest, coverage, popnet_pairs
from fsskern.data.transforms import TestTransform, TrainTransform
from fsskern.engine.config import DataConfig

DATA = Path(__file__).parents[1].parent / "shared" / "data"
FOLDS = [[4, 6, 9, 11], [12, 13, 14, 15], [16, 17, 18, 20], [21, 22, 23]]


@pytest.fixture(scope="module")
def msrc(tmp_path_factory):
    if not (DATA / "msrc_v2").is_dir():
        pytest.skip(f"real data {DATA / 'msrc_v2'} absent")
    cfg = DataConfig(dataset="folder", root=str(DATA / "msrc_v2"), classes="class_counts.tsv", params={"void": [0]},
                     folds=FOLDS, train_policy="bam", train_size=65, test_size=64, batch_size=2, num_workers=0)
    src = build_source(cfg, "test")
    return cfg, src, scan_labels(src, cache_dir=tmp_path_factory.mktemp("idx"))


class FakeSource:
    """A source without files: labels are what LabelStats says (enough for manifests)."""
    name, split = "pascal", "test"

    def __init__(self, n, novel):
        self.n, self.novel, self.class_names = n, novel, [str(c) for c in range(21)]

    def __len__(self):
        return self.n

    def fold_classes(self, fold):
        return [c for c in range(1, 21) if c not in self.novel], list(self.novel)

    def foreground_classes(self):
        return list(range(1, 21))


def test_manifest_is_a_pure_function_of_its_key(msrc):
    _, src, stats = msrc
    a = build_test_manifest(src, stats, 0, 5, 1, "bam", 510)
    b = build_test_manifest(src, stats, 0, 5, 1, "bam", 510)
    assert a.sha256 == b.sha256 and len(a) == 1000
    assert build_test_manifest(src, stats, 0, 5, 1, "bam", 365).sha256 != a.sha256
    assert build_test_manifest(src, stats, 1, 5, 1, "bam", 510).sha256 != a.sha256
    pools = stats.class_index(2048)
    for e in a.episodes:
        assert e.query not in e.supports and len(set(e.supports)) == 5
        assert e.classes[0] in FOLDS[0] and all(s in pools[e.classes[0]] for s in e.supports)
    # episode t does not depend on how many episodes were asked for
    assert build_test_manifest(src, stats, 0, 5, 1, "bam", 510, episodes=10).episodes == a.episodes[:10]


def test_exact_episode_counts_no_off_by_one(msrc):
    _, src, stats = msrc
    assert len(build_test_manifest(src, stats, 0, 1, 1, "pfenet", 321)) == 1000  # folder default
    fake = FakeSource(6, [1, 2, 3, 4, 5])
    pix = [{1: 5000}, {1: 5000, 2: 100}, {2: 3000}, {2: 3000}, {3: 3000, 4: 3000, 5: 3000}, {3: 3000, 4: 3000, 5: 3000}]
    stats = LabelStats(pix, {}, "k")
    m = build_test_manifest(fake, stats, 0, 1, 1, "pfenet", 321)
    assert len(m) == 5000  # PFENet's loop runs 5001
    assert [e.query for e in m.episodes[:7]] == [0, 1, 2, 3, 4, 5, 0]  # file order, repeated
    assert {e.classes[0] for e in m.episodes if e.query == 1} == {1}  # class 2 under 2048 px there
    quirk = build_test_manifest(fake, stats, 0, 1, 1, "pfenet-compat", 321, episodes=300)
    assert {e.classes[0] for e in quirk.episodes if e.query == 1} == {1, 2}  # PFENet draws it anyway
    hs = build_test_manifest(fake, stats, 0, 1, 1, "hsnet", 0, episodes=13)
    # every (image, class) pair once, in file order, then again: HSNet applies no size filter (image 1's
    # 100-pixel class 2 is a pair too)
    pairs = [(0, 1), (1, 1), (1, 2), (2, 2), (3, 2), (4, 3), (4, 4), (4, 5), (5, 3), (5, 4), (5, 5)]
    assert [(e.query, e.classes[0]) for e in hs.episodes] == pairs + pairs[:2]
    for name in ("cyctr", "hdmnet"):  # their dataset code draws the class among every novel class present
        drawn = build_test_manifest(fake, stats, 0, 1, 1, name, 123, episodes=300)
        assert {e.classes[0] for e in drawn.episodes if e.query == 1} == {1, 2}
    assert PROTOCOLS["hdmnet"].resize == "square"  # resized_val: cv2.resize to S x S, no pad
    # an HSNet split file: its pairs are the queries and a class's supports are the images listed with it
    # (build_img_metadata_classwise), not every image holding a pixel of the class (image 1 holds class 2)
    fake.listed_pairs = [(0, 1), (1, 1), (2, 2), (3, 2), (4, 3), (5, 3)]
    listed = build_test_manifest(fake, stats, 0, 1, 1, "hsnet", 0, episodes=60)
    assert [(e.query, e.classes[0]) for e in listed.episodes[:6]] == fake.listed_pairs
    for e in listed.episodes:
        assert {(s, e.classes[0]) for s in e.supports} <= set(fake.listed_pairs) and e.query not in e.supports
    fake.listed_pairs = [(0, 6), (1, 7)]  # another fold's file: none of fold 0's classes
    with pytest.raises(DataError, match="names no .image, class. pair of fold 0"):
        build_test_manifest(fake, stats, 0, 1, 1, "hsnet", 0, episodes=6)


def test_too_few_images_and_coverage(msrc):
    fake = FakeSource(3, [1, 2, 3, 4, 5])
    stats = LabelStats([{c: 4000 for c in (1, 2, 3, 4)}, {1: 4000, 2: 4000, 3: 4000, 4: 4000}, {5: 4000}], {}, "k")
    with pytest.raises(DataError, match="class 5 has 1 qualifying image"):
        build_test_manifest(fake, stats, 0, 1, 1, "balanced", 0)
    with pytest.raises(DataError, match=r"no image with >= 2048 px of class\(es\) \[2, 3, 4, 5\]"):
        build_test_manifest(fake, LabelStats([{1: 4000}, {1: 4000}, {}], {}, "k"), 0, 1, 1, "bam", 0)
    _, src, stats = msrc
    m = build_test_manifest(src, stats, 3, 1, 1, "balanced", 0)
    assert coverage(m, FOLDS[3]) == {21: 334, 22: 333, 23: 333}
    with pytest.warns(UserWarning, match="fewer than 400 episodes"):
        coverage(m, FOLDS[3], min_class_episodes=400)


def test_manifest_file_roundtrip_and_tamper(msrc, tmp_path):
    _, src, stats = msrc
    m = build_test_manifest(src, stats, 2, 1, 2, "panet", 1234, episodes=20)
    assert all(len(e.classes) == 2 and len(e.supports) == 2 for e in m.episodes)
    sha = m.save(tmp_path / "m.json")
    assert Manifest.load(tmp_path / "m.json").episodes == m.episodes and sha == m.sha256
    (tmp_path / "m.json").write_text((tmp_path / "m.json").read_text().replace('"seed": 1234', '"seed": 1'))
    with pytest.raises(DataError, match="does not match its sha256"):
        Manifest.load(tmp_path / "m.json")


def test_build_train_episodes_from_config(msrc, tmp_path):
    from fsskern.data.loader import build_train_episodes
    cfg, _, _ = msrc
    src = build_source(cfg, "train")
    episodes, pools = build_train_episodes(cfg, src, 2, seed=7, cache_dir=tmp_path)
    assert pools.dropped > 0 and set(episodes.classes) <= set(pools.base) and not set(pools.novel) & set(pools.train)
    loader = build_loader(dataclasses.replace(cfg, num_workers=1), "train", 2, episodes, True, source=src)
    classes = {epoch: [episodes.episode(epoch, i).classes[0] for i in range(4)] for epoch in (0, 1)}
    assert classes[0] != classes[1]
    for epoch in (0, 1):  # set_epoch between epochs reaches the worker (a persistent one would keep epoch 0)
        loader.dataset.set_epoch(epoch)
        batch = [b["classes"][:, 0].tolist() for b in itertools.islice(loader, 2)]
        assert sum(batch, []) == classes[epoch], epoch
    batch = next(iter(loader))
    assert batch["query_img"].shape == (2, 3, 65, 65) and batch["base_label"].shape == (2, 65, 65)


def test_training_episodes_from_seed_epoch_index(msrc, tmp_path):
    cfg, _, _ = msrc
    src = build_source(cfg, "train")
    pools = training_pools(src, scan_labels(src, cache_dir=tmp_path), 0, "bam", 2048, 0.1)
    a, b = TrainEpisodes(pools.train, {"seed": 1}, shots=2), TrainEpisodes(pools.train, {"seed": 1}, shots=2)
    assert [a.episode(3, i) for i in range(50)] == [b.episode(3, i) for i in reversed(range(50))][::-1]
    assert [a.episode(3, i) for i in range(20)] != [a.episode(4, i) for i in range(20)]
    novel = set(FOLDS[0])
    for i in range(len(a)):
        e = a.episode(0, i)
        assert e.query not in e.supports and e.classes[0] not in novel
    assert sorted(a.episode(0, i).query for i in range(len(a))) == a.queries  # an epoch visits every query once
    val = build_val_manifest(src, pools.val, 0, 1, 1, 0, 40, "k")
    held = {i for p in pools.val.values() for i in p}
    assert all(e.query in held and set(e.supports) <= held and e.classes[0] not in novel for e in val.episodes)
    assert not held & {i for p in pools.train.values() for i in p}


def _batches(loader):
    return [{k: v for k, v in b.items() if torch.is_tensor(v)} for b in loader]


def _same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_loader_identical_for_any_worker_count(msrc, tmp_path):
    cfg, src, stats = msrc
    m = build_test_manifest(src, stats, 0, 1, 1, "bam", 510, episodes=8)
    ds = EpisodeDataset(src, m, TestTransform(64, "pfenet"), False)
    runs = [_batches(DataLoader(ds, batch_size=2, num_workers=w, collate_fn=collate_episodes)) for w in (0, 2)]
    _same(*runs)
    train_src = build_source(cfg, "train")
    pools = training_pools(train_src, scan_labels(train_src, cache_dir=tmp_path), 0, "bam", 2048)
    te = TrainEpisodes(pools.train, {"seed": 5}, shots=1)
    base, novel = train_src.fold_classes(0)
    tds = EpisodeDataset(train_src, te, TrainTransform(65), True, base=base, novel=novel)
    sub = torch.utils.data.Subset(tds, range(6))
    runs = [_batches(DataLoader(sub, batch_size=3, num_workers=w, collate_fn=collate_episodes)) for w in (0, 2)]
    _same(*runs)
    b = runs[0][0]
    assert b["query_img"].shape == (3, 3, 65, 65) and b["support_masks"].shape == (3, 1, 65, 65)
    assert set(b["query_mask"].unique().tolist()) <= {0, 1, 255} and b["base_label"].max() <= 255


def test_world_sizes_shard_the_same_episodes(msrc):
    cfg, src, stats = msrc
    m = build_test_manifest(src, stats, 1, 1, 1, "hsnet", 0, episodes=7)
    whole = [int(i) for b in build_loader(cfg, "test", 1, m, False, source=src) for i in b["index"]]
    assert whole == list(range(7))
    shards = [list(ShardSampler(7, r, 2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == whole and not set(shards[0]) & set(shards[1])
    one = build_loader(cfg, "test", 1, m, False, source=src, batch_size=1)
    by_rank = {int(b["index"][0]): b["query_mask"] for r in range(2)
               for b in build_loader(cfg, "test", 1, m, False, sampler=ShardSampler(7, r, 2), source=src, batch_size=1)}
    for b in one:
        assert torch.equal(b["query_mask"], by_rank[int(b["index"][0])])


def test_box_supports_replace_only_the_support_masks(msrc):
    """Box supports (CRCNet Tab. 14): each support mask becomes the union of its class's component boxes
    at the original resolution; the query, the images and the episodes stay as they are."""
    _, src, stats = msrc
    m = build_test_manifest(src, stats, 1, 2, 1, "balanced", 0, episodes=6)
    masks = EpisodeDataset(src, m, TestTransform(0, "original"), False)
    boxes = EpisodeDataset(src, m, TestTransform(0, "original"), False, support_boxes=True)
    grew = 0
    for t in range(len(m)):
        a, b = masks[t], boxes[t]
        for k in ("query_img", "query_mask", "support_imgs", "query_label_orig"):
            assert torch.equal(a[k], b[k])
        for j, s in enumerate(m[t].supports):
            _, label = src.load(s)
            fg = label == m[t].classes[0]
            ys, xs = np.nonzero(fg)
            box = b["support_masks"][j].numpy()[:label.shape[0], :label.shape[1]]
            assert set(np.unique(box)) <= {0, 1} and box[fg].all()  # no void; every labelled pixel inside
            assert not box[:ys.min()].any() and not box[ys.max() + 1:].any()  # tight: nothing beyond the extent
            assert not box[:, :xs.min()].any() and not box[:, xs.max() + 1:].any()
            grew += int(box.sum() > fg.sum())
    assert grew == 2 * len(m)  # every box takes in background around its object (no MSRC-v2 object is a rectangle)
    parsing = type("ParsingSource", (), {"class_names": ["background", "hat"], "area_lut": [0, 1]})()
    with pytest.raises(DataError, match="box supports are not defined for parsing sources"):
        EpisodeDataset(parsing, m, TestTransform(0, "original"), False, support_boxes=True)


def test_eval_batch_labels_and_padding(msrc):
    cfg, src, stats = msrc
    m = build_test_manifest(src, stats, 0, 1, 1, "balanced", 0, episodes=4)
    ds = EpisodeDataset(src, m, TestTransform(0, "original"), False)
    b = collate_episodes([ds[i] for i in range(4)])
    e = m[0]
    _, label = src.load(e.query)
    want = np.where(label == e.classes[0], 1, np.where(label == 255, 255, 0))
    assert torch.equal(b["query_label_orig"][0], torch.from_numpy(want))
    h, w = label.shape
    assert torch.equal(b["query_mask"][0, :h, :w], torch.from_numpy(want))
    assert (b["query_mask"][0, h:] == 255).all() and (b["query_img"][0, :, h:] == 0).all()
    assert b["restore"][0]["orig_h"] == h and len(b["restore"]) == 4


def test_popnet_frozen_pairs():
    class Parsing(FakeSource):
        name = "parsing"
        query_pool, support_pool, test_class_order = list(range(30)), list(range(30, 400)), [2, 1]

        def foreground_classes(self):
            return [1, 2]
    src = Parsing(400, [2])
    stats = LabelStats([{1: 10, 2: 10} for _ in range(400)], {}, "k")
    m = build_test_manifest(src, stats, 0, 1, 2, "popnet", 0)
    assert len(m) == 300 and len({e.query for e in m.episodes}) == 20
    assert len({e.supports[0] for e in m.episodes}) == 300
    assert m[0].classes == (1, 2) and m[0].supports[0] == m[0].supports[1] and m[0].query == 0
    assert [e.query for e in m.episodes[:16]] == [0] * 15 + [1]
    one_way = popnet_pairs(src, stats, 0, 1, 1, {"k": 1})
    assert one_way[0].classes == (2,) and one_way[150].classes == (1,)
    # a class of the list that no image holds (LIP's hat on VITON) gets no pairs of its own, with a warning
    src.test_class_order = [2, 3, 1]
    src.foreground_classes = lambda: [1, 2, 3]
    with pytest.warns(UserWarning, match=r"no image holds 3 \("):
        pairs = popnet_pairs(src, stats, 0, 1, 2, {"k": 1})
    assert len(pairs) == 300 and pairs[0].classes == (1, 2, 3)
    # a class whose few images earlier classes already took has no fresh image even at 1 support per query
    # (VITON's shoes): it keeps no pair, the others one support per query, and the warning names it
    for i in (0, 1, 2):
        stats.pixels[i] = {**stats.pixels[i], 3: 5}
    with pytest.warns(UserWarning, match=r"too few fresh images for 3 \(3\): 0 queries"):
        pairs = popnet_pairs(src, stats, 0, 1, 2, {"k": 1})
    assert len(pairs) == 20 and {e.query for e in pairs} == set(range(20))
    assert set(PROTOCOLS) >= {"pfenet", "bam", "hsnet", "panet", "popnet", "cyctr", "hdmnet", "balanced"}


def test_popnet_pairs_from_one_pool_keep_every_query_its_supports_allow():
    """A folder of parsing images (CCP, VITON) queries and supports from one pool: a class short of fresh images
    gets the most queries whose supports fit, a query let go serving as a support (8 fresh images, 1 shot: 4
    pairs; cutting the 8 queries to the 0 supports left made none)."""
    class OnePool(FakeSource):
        name = "parsing"
        query_pool = support_pool = list(range(8))
        test_class_order = [1]

        def foreground_classes(self):
            return [1]
    stats = LabelStats([{1: 10} for _ in range(8)], {}, "k")
    with pytest.warns(UserWarning, match=r"too few fresh images for 1 \(1\): 4 queries"):
        pairs = popnet_pairs(OnePool(8, [1]), stats, 0, 1, 1, {"k": 1})
    assert [e.query for e in pairs] == [0, 1, 2, 3] and [e.supports for e in pairs] == [(4,), (5,), (6,), (7,)]


def test_parsing_kway_and_one_way_training_episodes(tmp_path, monkeypatch):
    if not (DATA / "viton_parsing").is_dir():
        pytest.skip(f"real data {DATA / 'viton_parsing'} absent")
    from fsskern.data.episodes import KWayTrainEpisodes, parsing_train_episodes
    cfg = DataConfig(dataset="parsing", root=str(DATA / "viton_parsing"),
                     params={"preset": "lip", "test_fraction": 0.5},  # the pfenet policy needs a test split
                     hierarchy={"head": ["hat", "hair", "face"], "body": ["upper-clothes", "dress", "coat", "jumpsuits",
                                "skirt"], "arms": ["arms"], "legs": ["pants", "legs", "shoes"]})
    src = build_source(cfg, "train")
    src.samples = src.samples[:40]  # a slice of the real set keeps the test quick
    src.query_pool, src.support_pool = list(range(20)), list(range(20, 40))
    pools = training_pools(src, scan_labels(src, cache_dir=tmp_path), 0, "pfenet", 1).train
    kway = parsing_train_episodes(src, pools, {"s": 0}, shots=1, ways=2)
    assert isinstance(kway, KWayTrainEpisodes) and len(kway) == 20
    e = kway.episode(0, 3)
    assert e.query < 20 and set(e.supports) == {e.supports[0]} and e.supports[0] >= 20
    assert set(e.classes) <= set(src.fold_classes(0)[0]) and not set(e.classes) & {6, 9, 12}
    base, novel = src.fold_classes(0)
    b = EpisodeDataset(src, kway, TrainTransform(65), True, base=base, novel=novel)[3]
    assert b["support_imgs"].shape == (len(e.classes), 3, 65, 65) and b["query_areas"].max() <= 255
    assert torch.equal(b["support_imgs"][0], b["support_imgs"][-1])  # one annotated support, all ways
    # the crop keeps the foreground of every way of the shared support, not only the first way's
    seen = []
    crop = TrainTransform._crop_offsets
    monkeypatch.setattr(TrainTransform, "_crop_offsets",
                        lambda self, lbl, *a: seen.append(lbl.copy()) or crop(self, lbl, *a))
    EpisodeDataset(src, kway, TrainTransform(65, scale=(1, 1), rotate=0, flip=False), True, base=base, novel=novel)[3]
    union = np.isin(src.load(e.supports[0])[1], e.classes)
    assert len(seen) == 2 and np.array_equal(seen[1], union)  # the query's, then the support's union
    assert (np.isin(src.load(e.supports[0])[1], e.classes[:1]) < union).any()  # more than the first way's
    one = parsing_train_episodes(src, pools, {"s": 0}, shots=1, ways=1)
    for i in range(len(one)):
        e = one.episode(1, i)
        assert e.query < 20 and e.supports[0] >= 20
    # stage 1's person (notes A2): every labelled pixel, novel classes included, where the areas drop them.
    # At scale 0.1 the whole image fits the 65 px crop, so a query showing legs keeps them.
    whole = EpisodeDataset(src, kway, TrainTransform(65, scale=(0.1, 0.1)), True, base=base, novel=novel)
    t = next(t for t in range(len(kway)) if np.isin(src.load(kway.episode(0, t).query)[1], [6, 9, 12]).any())
    b = whole[t]
    areas, human = b["query_areas"], b["query_human"]
    assert torch.equal(human == 255, areas == 255) and ((areas > 0) & (areas != 255) <= (human == 1)).all()
    assert ((human == 1) & (areas == 0)).any()  # the novel leg area: background for stage 2, person for stage 1
    assert b["support_human"].shape == b["support_areas"].shape


def test_training_classes_without_enough_supports_are_reported():
    pools = {1: [0, 1, 2], 2: [3]}
    with pytest.warns(UserWarning, match=r"classes \[2\] have fewer than 2 images"):
        te = TrainEpisodes(pools, {"s": 0}, shots=1)
    assert te.excluded == [2] and te.queries == [0, 1, 2]
    with pytest.raises(DataError, match="training needs 1 class"):
        with pytest.warns(UserWarning):
            TrainEpisodes({1: [0]}, {"s": 0}, shots=1)
    # disjoint query/support pools: one support image is enough for 1-shot, not for 2-shot
    assert TrainEpisodes({1: [0, 1]}, {"s": 0}, shots=1, support_pools={1: [5]}).excluded == []
    with pytest.warns(UserWarning, match="never sampled"):
        TrainEpisodes({1: [0, 1], 2: [0]}, {"s": 0}, shots=2, support_pools={1: [5, 6], 2: [7]})


def test_protocol_decides_the_test_transform():
    from fsskern.data.loader import test_transform_for
    cfg = DataConfig(dataset="coco", test_size=473)
    assert repr(test_transform_for(cfg, "pfenet")) == "TestTransform(size=641, rule='pfenet', score_at='original', antialias=True)"
    assert repr(test_transform_for(cfg, "hsnet")) == "TestTransform(size=400, rule='square', score_at='input', antialias=True)"
    # the paper's 512 x 512 (notes A6); the CPU recipes replace the rule with eval.resize
    assert repr(test_transform_for(cfg, "popnet")) == "TestTransform(size=512, rule='square', score_at='original', antialias=True)"
    assert PROTOCOLS["bam"].describe("pascal")["seeds"] == [510, 365, 382, 322, 988]
    with pytest.raises(DataError, match="unknown protocol 'pfnet'"):
        test_transform_for(cfg, "pfnet")


def test_draw_supports_skips_the_query_without_copying_the_pool():
    from fsskern.data.episodes import draw_supports, episode_rng
    rng = episode_rng("t")
    assert sorted(draw_supports(rng, [2, 5, 7, 9], 5, 3, 1)) == [2, 7, 9]
    assert sorted(draw_supports(rng, [2, 5, 7, 9], 9, 3, 1)) == [2, 5, 7]
    assert sorted(draw_supports(rng, [2, 5, 7, 9], 4, 4, 1)) == [2, 5, 7, 9]  # query outside the pool
    seen = {s for _ in range(200) for s in draw_supports(rng, list(range(10)), 0, 1, 1)}
    assert seen == set(range(1, 10))
    with pytest.raises(DataError, match="class 3 has 2 qualifying image"):
        draw_supports(rng, [1, 4], 4, 2, 3)


def test_bam_draws_the_query_class_among_every_novel_class_present():
    """BAM's util/dataset.py picks the query's class among all novel classes in its label, under 2048 px too
    (the filter gates the list and the support pools only), as PFENet's does."""
    fake = FakeSource(6, [1, 2, 3, 4, 5])
    pix = [{1: 5000}, {1: 5000, 2: 100}, {2: 3000}, {2: 3000}, {3: 3000, 4: 3000, 5: 3000}, {3: 3000, 4: 3000, 5: 3000}]
    m = build_test_manifest(fake, LabelStats(pix, {}, "k"), 0, 1, 1, "bam", 510, episodes=300)
    assert {e.classes[0] for e in m.episodes if e.query == 1} == {1, 2}
    assert all(e.supports[0] != 1 for e in m.episodes if e.classes[0] == 2)  # image 1 is no class-2 support
