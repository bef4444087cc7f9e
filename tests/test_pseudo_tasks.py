"""UMTFSS stage A (fsskern.pseudo_tasks) on six real MSRC-v2 photos at a small size: labels, filters,
neighbour lists, byte-identical rebuilds, resume after a kill, reuse, the pseudo source and its
episodes, the engine hook and bad inputs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fsskern import pseudo_tasks as pt
from fsskern.data import DataError, build_source
from fsskern.data.datasets.pseudo import NeighbourEpisodes, read_span, span_filter
from fsskern.data.index import scan_labels, training_pools
from fsskern.data.loader import build_loader
from fsskern.engine.config import ConfigError, DataConfig, load_config

MSRC = Path(__file__).parents[1].parent / "shared" / "data" / "msrc_v2"
IDS = ["1_10_s", "1_11_s", "3_10_s", "3_11_s", "7_10_s", "7_11_s"]  # grass/cow, buildings, faces... (320 x 213)
OUTPUTS = ("index.json", "regions.npy", "neighbours.npy", "centroids.npy")


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    import faiss
    faiss.omp_set_num_threads(1)


def data_cfg(root, list_file, **build) -> DataConfig:
    images = {"dataset": "folder", "root": str(MSRC), "classes": "class_counts.tsv",
              "params": {"void": [0], "split_lists": {"train": str(list_file)}}}
    spec = {"images": images, "backbone": "mobilenet_v2", "weights": "imagenet", "output_stride": 16, "size": 129,
            "assign_size": 129, "descriptor_size": 129, "clusters": 4, "batch_size": 2, **build}
    return DataConfig(dataset="pseudo", root=str(root), train_size=65, val_fraction=0.0, params={"build": spec})


@pytest.fixture(scope="module")
def list_file(tmp_path_factory):
    if not (MSRC / "images").is_dir():
        pytest.skip(f"real data {MSRC} absent")
    path = tmp_path_factory.mktemp("lists") / "six.txt"
    path.write_text("\n".join(IDS) + "\n")
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, list_file):
    import faiss
    faiss.omp_set_num_threads(1)
    cfg = data_cfg(tmp_path_factory.mktemp("built") / "tasks", list_file)
    result = pt.build_pseudo_tasks(cfg, progress=False)
    return cfg, result


def files(root: Path) -> dict:
    paths = [root / f for f in OUTPUTS] + sorted((root / "pseudo").glob("*.png"))
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in paths}


def test_labels_regions_and_neighbours(built):
    cfg, result = built
    root = Path(cfg.root)
    index = json.loads((root / "index.json").read_text())
    assert index["samples"] == IDS and index["filters"] == {"min_pixels": 2048, "span": 0.99}
    assert not (root / ".build").exists() and result["regions"] > 0
    regions, neighbours = np.load(root / "regions.npy"), np.load(root / "neighbours.npy")
    expected = set()
    for i, sid in enumerate(IDS):
        label = np.asarray(Image.open(root / "pseudo" / f"{sid}.png"))
        w, h = Image.open(MSRC / "images" / index["images"][i]).size
        assert label.shape == (h, w) and label.max() < 4  # original resolution, clusters 0..N-1
        expected |= {(i, c, n) for c, n in span_filter(label, 0.99).items() if n >= 2048}
    assert {(s, c, n) for s, c, n, _, _ in regions} == expected  # exactly the regions both filters keep
    by_cluster = {c: {s for s, cc, *_ in regions if cc == c} for c in range(4)}
    for s, c, _, start, count in regions:
        nb = neighbours[start:start + count]
        assert s not in nb and set(nb) <= by_cluster[c]
        assert count == len(by_cluster[c]) - 1  # fewer than 20 regions: every other one, each once
        assert len(set(nb)) == count


def test_span_filter_drops_stuff():
    label = np.zeros((100, 100), np.int64)
    label[:, :50] = 1            # every row: stuff (so is 0, the rest)
    label[10:60, 60:100] = 2     # rows and columns free
    label[0:99, 55:58] = 3       # one free row = 1 %: kept (the code drops below 1 %)
    assert span_filter(label, 0.99) == {2: 2000, 3: 297}
    assert span_filter(label.T, 0.99) == {2: 2000, 3: 297}  # the same along the columns
    for span in (99, 0, -0.5, "all"):  # 99 (a percentage) kept every region, 0 none
        with pytest.raises(DataError, match="data.params.span must be a fraction in \\(0, 1\\]"):
            read_span(span)
    assert read_span(1) == 1.0 and read_span("0.99") == 0.99


def test_neighbours_are_the_top_half_by_cosine():
    desc = np.random.default_rng(0).normal(size=(41, 16)).astype(np.float32)
    nb = {"fraction": 0.5, "max": 5000, "all_below": 20, "max_candidates": 20000}
    lists = pt.neighbour_lists(desc, nb, np.random.default_rng(0))
    unit = desc / np.linalg.norm(desc, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    for r, got in enumerate(lists):  # k = min(floor(0.5 * 41), 5000) = 20, nearest first, never itself
        np.testing.assert_array_equal(got, np.argsort(-sim[r], kind="stable")[:20])
    capped = pt.neighbour_lists(desc, {**nb, "max": 7, "max_candidates": 30}, np.random.default_rng(0))
    pool = set(np.concatenate(capped).tolist())
    assert all(len(c) == 7 for c in capped) and len(pool) <= 30  # searched among 30 seeded candidates


def test_masked_means_equal_upsample_then_average():
    feats = torch.randn(5, 4, 6)
    label = np.random.default_rng(0).integers(0, 3, (37, 53))
    up = F.interpolate(feats[None], size=label.shape, mode="bilinear", align_corners=True)[0]
    want = np.stack([up[:, torch.from_numpy(label == c)].mean(1).numpy() for c in (0, 2)])
    np.testing.assert_allclose(pt.masked_means(feats, label, [0, 2]), want, rtol=1e-5, atol=1e-6)


def test_assign_maps_valid_cells_onto_the_image():
    """Cells (2 x 3) each nearest its own centroid; the corners of any H x W take the corner cells."""
    cents = F.normalize(torch.randn(6, 8), dim=1)
    feats = cents.T.reshape(8, 2, 3)
    label = pt.assign(feats, cents.numpy(), (40, 90))
    assert label.shape == (40, 90)
    assert [label[0, 0], label[0, -1], label[-1, 0], label[-1, -1]] == [0, 2, 3, 5]


def test_canvas_keeps_only_the_valid_cells():
    emb = pt.Embedder(pt.build_spec({"images": {"dataset": "x"}, "backbone": "mobilenet_v2", "weights": "imagenet",
                                     "output_stride": 16}))
    image = np.zeros((213, 320, 3), np.uint8)
    (f,) = emb.canvas([image], 129)  # 129 x 86 content -> ceil(/16) = 9 x 6 cells of a 9 x 9 map
    assert f.shape == (320, 6, 9)
    torch.testing.assert_close(f.norm(dim=0), torch.ones(6, 9))


def test_superpixel_vote_covers_every_segment():
    image = np.zeros((60, 80, 3), np.uint8)
    image[:, 40:] = 255                               # two flat halves: two segments
    label = np.zeros((60, 80), np.int64)
    label[:, 40:] = 2
    label[5:10, 5:10], label[50:55, 70:75] = 1, 1      # noise in both halves, the last segment included
    voted = pt.superpixel_vote(label, image, 3, 100, 0.8, 200)
    assert (voted[:, :40] == 0).all() and (voted[:, 40:] == 2).all()


def test_same_images_same_seed_same_bytes(built, list_file, tmp_path):
    cfg, _ = built
    again = data_cfg(tmp_path / "again", list_file)
    pt.build_pseudo_tasks(again, progress=False)
    assert files(Path(cfg.root)) == files(tmp_path / "again")


def test_resume_after_kills_gives_the_same_files(built, list_file, tmp_path, monkeypatch):
    cfg = data_cfg(tmp_path / "killed", list_file)
    real = pt.read_image
    for kill_at in (3, 7):  # in the k-means vector pass, then in the label pass of the second run
        calls = []

        def dying(path):
            calls.append(path)
            if len(calls) == kill_at:
                raise KeyboardInterrupt
            return real(path)
        monkeypatch.setattr(pt, "read_image", dying)
        with pytest.raises(KeyboardInterrupt):
            pt.build_pseudo_tasks(cfg, progress=False)
        assert not (tmp_path / "killed" / "index.json").exists()
    state = tmp_path / "killed" / ".build"
    assert json.loads((state / "vectors.json").read_text())["done"] == 6 and (state / "centroids.npy").is_file()
    assert len(list((state / "records").glob("*.npz"))) == 2  # the second run labelled one batch
    monkeypatch.setattr(pt, "read_image", real)
    real_label, labelled = pt._label_image, []

    def dying_label(*args):  # a third run killed inside a batch, its first image labelled
        labelled.append(args[7])
        if len(labelled) == 2:
            raise KeyboardInterrupt
        return real_label(*args)
    monkeypatch.setattr(pt, "_label_image", dying_label)
    with pytest.raises(KeyboardInterrupt):
        pt.build_pseudo_tasks(cfg, progress=False)
    assert labelled == [2, 3] and len(list((state / "records").glob("*.npz"))) == 3
    monkeypatch.setattr(pt, "_label_image", real_label)
    read = []
    monkeypatch.setattr(pt, "read_image", lambda path: read.append(Path(path).stem) or real(path))
    assert not pt.build_pseudo_tasks(cfg, progress=False)["reused"]
    # the cut batch is embedded again whole, as the uninterrupted build embedded it (not [3, 4], [5])
    assert sorted(read) == sorted(IDS[2:])
    assert files(tmp_path / "killed") == files(Path(built[0].root))


def test_a_missing_stage_a_package_is_named_with_its_install(list_file, tmp_path, monkeypatch):
    """Without the umtfss extra the build stops before any work, naming the packages (a bare ModuleNotFoundError
    after the embeddings before)."""
    real = pt.importlib.util.find_spec
    monkeypatch.setattr(pt.importlib.util, "find_spec", lambda name: None if name == "faiss" else real(name))
    with pytest.raises(DataError, match=r"needs faiss-cpu: pip install faiss-cpu .*'\.\[umtfss\]'"):
        pt.build_pseudo_tasks(data_cfg(tmp_path / "tasks", list_file), progress=False)
    assert not (tmp_path / "tasks" / ".build").exists()


def test_reuse_and_refusal_of_another_block(built, list_file):
    cfg, _ = built
    assert pt.build_pseudo_tasks(cfg, progress=False)["reused"]
    other = data_cfg(cfg.root, list_file, clusters=5)
    with pytest.raises(DataError, match="another data.params.build"):
        pt.build_pseudo_tasks(other, progress=False)


def test_source_reads_the_build_and_draws_neighbour_supports(built, tmp_path):
    cfg, _ = built
    src = build_source(cfg, "train")
    assert src.samples[0][1] == str(MSRC / "images" / f"{IDS[0]}.png")  # read in place
    stats = scan_labels(src, cache_dir=tmp_path)
    pools = training_pools(src, stats, 0, "pfenet", cfg.min_pixels, cfg.val_fraction)
    regions = np.load(Path(cfg.root) / "regions.npy")
    assert {(s, c + 1) for s, c, *_ in regions} == {(s, c) for c, p in pools.train.items() for s in p}
    episodes = src.train_episodes(pools.train, {"seed": 0}, shots=1)
    assert isinstance(episodes, NeighbourEpisodes)
    neighbours = np.load(Path(cfg.root) / "neighbours.npy")
    for i in range(len(episodes)):
        e = episodes.episode(0, i)
        start, count = next((int(a), int(n)) for s, c, _, a, n in regions if (s, c + 1) == (e.query, e.classes[0]))
        near = sorted({int(s) for s in neighbours[start:start + count]} & set(pools.train[e.classes[0]]))
        want = near if set(near) - {e.query} else sorted(pools.train[e.classes[0]])
        assert sorted(episodes.candidates(e.query, e.classes[0])) == want  # the query's region's own list
        assert e.supports[0] != e.query and e.supports[0] in want
    batch = next(iter(build_loader(cfg, "train", 0, episodes, train=True, source=src, batch_size=2)))
    assert batch["query_img"].shape == (2, 3, 65, 65) and batch["support_masks"].shape == (2, 1, 65, 65)
    assert set(batch["support_masks"].unique().tolist()) <= {0, 1, 255} and (batch["query_mask"] == 1).any()


def test_neighbour_supports_come_from_the_query_regions_list():
    """24 images of one pseudo class, each region's list one neighbour long (the next image): every support is
    that neighbour, not any image of the pool; a list that leaves no other image falls back to the pool."""
    n = 24
    regions = np.array([(s, 0, 100, s, 1) for s in range(n)])  # (sample, cluster, pixels, list start, length)
    neighbours = np.array([(s + 1) % n for s in range(n)])
    neighbours[5] = 5  # image 5's list holds only itself
    episodes = NeighbourEpisodes({1: list(range(n))}, {"seed": 0}, 1, 1, regions, neighbours)
    assert episodes.candidates(0, 1) == [1] and episodes.candidates(5, 1) == list(range(n))
    drawn = {episodes.episode(0, i).query: episodes.episode(0, i).supports[0] for i in range(len(episodes))}
    assert len(drawn) == n and all(drawn[q] == (q + 1) % n for q in drawn if q != 5) and drawn[5] != 5


def test_source_refuses_other_filters(built):
    cfg, _ = built
    with pytest.raises(DataError, match="built with span 0.99 and min_pixels 2048"):
        build_source(DataConfig(dataset="pseudo", root=cfg.root, min_pixels=1000), "train")


def test_engine_hook_builds_pseudo_phases_only(built, list_file, tmp_path):
    cfg, _ = built
    tree = {"data": {"dataset": "folder", "root": str(MSRC), "classes": "class_counts.tsv",
                     "params": {"void": [0]}},
            "train": {"phases": [{"name": "unsup", "config": {"data.dataset": "pseudo", "data.root": cfg.root,
                                                              "data.params": dict(cfg.params)}},
                                 {"name": "finetune"}]}}
    assert [r["reused"] for r in pt.ensure_for_run(load_config(tree=tree), progress=False)] == [True]
    assert pt.ensure_for_run(load_config(tree={"data": tree["data"]})) == []


def test_bad_inputs(list_file, tmp_path, capsys):
    with pytest.raises(DataError, match="weights file not found: .*moco.pth"):
        pt.build_pseudo_tasks(data_cfg(tmp_path / "a", list_file, backbone="resnet50",
                                       weights=str(tmp_path / "moco.pth")), progress=False)
    empty = tmp_path / "empty"
    (empty / "images").mkdir(parents=True)
    (empty / "classes.txt").write_text("background\nthing\n")
    cfg = data_cfg(tmp_path / "b", list_file)
    cfg.params["build"]["images"] = {"dataset": "folder", "root": str(empty), "classes": "classes.txt"}
    with pytest.raises(DataError, match="no image in"):
        pt.build_pseudo_tasks(cfg, progress=False)
    for bad, match in [({"clusterz": 3}, "unknown data.params.build key"), ({"weights": None}, "weights is required"),
                       ({"size": "big"}, "size must be int"), ({"clusters": 300}, "clusters must be in 2..254"),
                       ({"kmeans": {"iters": 3}}, "kmeans takes the keys")]:
        with pytest.raises(ConfigError, match=match):
            pt.build_spec({"images": {"dataset": "folder"}, "weights": "imagenet", **bad})
    with pytest.raises(DataError, match="cannot make 50 clusters"):
        pt.run_kmeans(np.zeros((10, 4), np.float32), 50, pt.DEFAULTS["kmeans"], 0)
    # the trainer's entry stops before training, with the reason
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(json.dumps({"out": str(tmp_path / "run"), "data": {
        "dataset": "pseudo", "root": str(tmp_path / "c"),
        "params": {"build": {**data_cfg(tmp_path, list_file).params["build"], "weights": str(tmp_path / "no.pth")}}}}))
    # an index whose samples repeat an image: a query could be its own support
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "index.json").write_text(json.dumps({"version": 1, "num_clusters": 3, "samples": ["a", "b", "a"]}))
    with pytest.raises(DataError, match=r"samples repeat \['a'\]"):
        build_source(DataConfig(dataset="pseudo", root=str(tmp_path / "d")), "train")
    from fsskern.engine.cli import train_main
    assert train_main([str(cfg_file)]) == 2
    assert "stage A: data.params.build.weights: weights file not found" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_labels_of_nested_ids_are_written(tmp_path):
    # FSS-1000's ids are "class/stem": the label's folder under pseudo/ did not exist, after every image's
    # backbone pass and k-means
    pt.write_png(tmp_path / "pseudo" / "cat" / "1.png", np.ones((4, 4), np.uint8))
    assert (np.array(Image.open(tmp_path / "pseudo" / "cat" / "1.png")) == 1).all()


def test_the_script_says_which_overrides_a_phase_shadows(tmp_path, monkeypatch):
    """python/build_pseudo_tasks.py: the recipe's stage-A phase sets its whole data.params, so a build key on the
    command line does not reach it; the script says so (it reported success with the recipe's value before)."""
    from conftest import load_script
    repo = Path(__file__).resolve().parents[1]
    script = load_script(repo / "python" / "build_pseudo_tasks.py")
    monkeypatch.chdir(tmp_path)  # the recipe's relative image folder is not here: the build stops at once
    with pytest.warns(UserWarning, match="phase 'unsup' keeps its own data.params=.*data.params.build.clusters=40"):
        code = script.main([str(repo / "configs" / "umtfss" / "msrc_v2_mobilenet_v2.yaml"),
                            "data.params.build.clusters=40", "--quiet"])
    assert code == 2
