"""Dataset sources on real files (../shared/data) and on tiny synthetic layouts; every bad input
raises DataError with a message naming the file or value."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fsskern.data import DataError, build_source
from fsskern.data.datasets.coco import COCO_CLASSES, coco_novel_classes
from fsskern.data.index import base_label_lut, scan_labels, training_pools
from fsskern.engine.config import DataConfig

DATA = Path(__file__).parents[1].parent / "shared" / "data"


def need(name):
    if not (DATA / name).is_dir():
        pytest.skip(f"real data {DATA / name} absent")
    return DATA / name


def write_pair(root, sid, label, image_dir="images", label_dir="labels", ext=".jpg", palette=False):
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    (root / label_dir).mkdir(parents=True, exist_ok=True)
    h, w = label.shape
    rgb = (np.random.default_rng(len(sid)).random((h, w, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / image_dir / (sid + ext))
    lbl = Image.fromarray(label.astype(np.uint8))
    if palette:
        lbl = lbl.convert("P")
        lbl.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])
    lbl.save(root / label_dir / (sid + ".png"))


def blocks(h, w, *regions):
    """A label map with (value, y0, y1, x0, x1) rectangles."""
    lbl = np.zeros((h, w), dtype=np.int64)
    for v, y0, y1, x0, x1 in regions:
        lbl[y0:y1, x0:x1] = v
    return lbl


# ---- real files -------------------------------------------------------------------------------

def test_msrc_real_void_is_ignore_and_folds():
    root = need("msrc_v2")
    cfg = DataConfig(dataset="folder", root=str(root), classes="class_counts.tsv", params={"void": [0]},
                     folds=[[4, 6, 9, 11], [12, 13, 14, 15], [16, 17, 18, 20], [21, 22, 23]])
    src = build_source(cfg, "test")
    assert len(src) == 591 and src.class_names[5] == "horse" and src.class_names[23] == "boat"
    image, label = src.load(0)
    assert image.dtype == np.uint8 and image.shape == (213, 320, 3) and label.dtype == np.int64
    assert set(np.unique(label)) <= {14, 255}  # 10_10_s: flower + void
    base, novel = src.fold_classes(3)
    assert novel == [21, 22, 23] and 5 in base and 7 in base
    with pytest.raises(DataError, match="fold 4 out of range"):
        src.fold_classes(4)


def test_msrc_config_file_matches_readme_counts():
    import yaml
    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "data" / "msrc_v2.yaml").read_text())["data"]
    novel = [c for f in cfg["folds"] for c in f]
    assert len(novel) == len(set(novel)) == 15 and 5 not in novel
    assert not set(novel) & {1, 2, 3, 7, 8, 10, 19}


def test_msrc_stuff_is_background_to_the_base_learner():
    """MSRC-v2 labels every pixel, so BAM's base learner would never see its background class and would
    read every novel object as some base class (RILFS/BAM on MSRC scored 0 mIoU): stuff is its background."""
    import torch
    from fsskern.data.episodes import TrainEpisodes
    from fsskern.data.loader import EpisodeDataset
    from fsskern.data.transforms import TrainTransform
    root = need("msrc_v2")
    folds = [[4, 6, 9, 11], [12, 13, 14, 15], [16, 17, 18, 20], [21, 22, 23]]
    stuff = [1, 2, 3, 7, 8, 10, 19]
    cfg = DataConfig(dataset="folder", root=str(root), classes="class_counts.tsv", folds=folds,
                     params={"void": [0], "stuff": stuff})
    src = build_source(cfg, "train")
    base, novel = src.fold_classes(0)
    objects = src.base_learner_classes(base)
    assert len(objects) == 12 and not set(objects) & set(stuff) and set(stuff) <= set(base)
    pools = training_pools(src, scan_labels(src), 0, "bam")
    ds = EpisodeDataset(src, TrainEpisodes(pools.train, {"seed": 0}), TrainTransform(65), True, base=base, novel=novel)
    labels = [ds[i]["base_label"] for i in range(4)]
    values = set(torch.cat([y.flatten() for y in labels]).tolist()) - {255}
    assert values <= set(range(13)) and 0 in values  # 12 object classes, stuff read as background 0
    with pytest.raises(DataError, match="stuff"):
        build_source(DataConfig(dataset="folder", root=str(root), classes="class_counts.tsv", folds=[[4, 7]],
                                params={"void": [0], "stuff": stuff}), "train")


def test_an_unsplit_folder_refuses_the_pfenet_policy():
    """Without a split every MSRC-v2 test query is a training image: pfenet would train on it with its novel pixels
    as background (RILFS's and BAM's base learner did, until session 49); bam keeps none of them, a split is sound."""
    root = need("msrc_v2")
    cfg = DataConfig(dataset="folder", root=str(root), classes="class_counts.tsv", folds=[[4, 6, 9, 11]],
                     params={"void": [0]})
    src = build_source(cfg, "train")
    stats = scan_labels(src)
    with pytest.raises(DataError, match="its test split holds every image"):
        training_pools(src, stats, 0, "pfenet")
    kept = {i for pool in training_pools(src, stats, 0, "bam").train.values() for i in pool}
    assert kept and not any(set(stats.pixels[i]) & {4, 6, 9, 11} for i in kept)  # no test query among them
    split = DataConfig(**{**vars(cfg), "params": {"void": [0], "test_fraction": 0.5}})
    src = build_source(split, "train")
    assert training_pools(src, scan_labels(src), 0, "pfenet").train


def test_folder_train_list_selects_a_label_subset(tmp_path):
    """data.train_list (a few-label subset, e.g. UMTFSS stage C's 20 %) narrows the folder's train split only."""
    root = need("msrc_v2")
    (tmp_path / "few.txt").write_text("10_12_s\n1_1_s\n10_12_s\n")  # an id listed twice is one sample
    kw = dict(dataset="folder", root=str(root), classes="class_counts.tsv", params={"void": [0]})
    src = build_source(DataConfig(**kw, train_list=str(tmp_path / "few.txt")), "train")
    assert [src.sample_id(i) for i in range(len(src))] == ["10_12_s", "1_1_s"]
    assert len(build_source(DataConfig(**kw, train_list=str(tmp_path / "few.txt")), "test")) == 591
    relative = DataConfig(**{**kw, "root": os.path.relpath(root)}, train_list=os.path.relpath(tmp_path / "few.txt"))
    assert len(build_source(relative, "train")) == 2  # a cwd-relative list under a cwd-relative root
    with pytest.raises(DataError, match="give one"):
        build_source(DataConfig(**{**kw, "params": {"void": [0], "split_lists": {"train": "x.txt"}}},
                                train_list=str(tmp_path / "few.txt")), "train")
    # a test list alone: training reads the other images, not the test queries too
    (tmp_path / "test.txt").write_text("10_12_s\n1_1_s\n")
    held_out = DataConfig(**kw, val_list=str(tmp_path / "test.txt"))
    assert len(build_source(held_out, "test")) == 2
    train = build_source(held_out, "train")
    assert len(train) == 589 and not {"10_12_s", "1_1_s"} & {train.sample_id(i) for i in range(len(train))}
    # test and val lists: train reads neither's images; val its own
    (tmp_path / "val.txt").write_text("2_1_s\n")
    lists = DataConfig(**{**kw, "params": {"void": [0], "split_lists": {"test": str(tmp_path / "test.txt"),
                                                                        "val": str(tmp_path / "val.txt")}}})
    train = build_source(lists, "train")
    assert len(train) == 588 and not {"10_12_s", "1_1_s", "2_1_s"} & {train.sample_id(i) for i in range(len(train))}
    assert [build_source(lists, "val").sample_id(0)] == ["2_1_s"] and len(build_source(lists, "test")) == 2
    with_train = DataConfig(**{**kw, "params": lists.params}, train_list=str(tmp_path / "few.txt"))
    assert len(build_source(with_train, "train")) == 2 and len(build_source(with_train, "test")) == 2
    assert [build_source(with_train, "val").sample_id(0)] == ["2_1_s"]  # train_list is not val's list


def test_voc_sample_real_palette_indices(tmp_path):
    root = need("voc2012_sample")
    src = build_source(DataConfig(dataset="pascal", root=str(root)), "train")
    assert len(src) == 102
    image, label = src.load(0)
    assert set(np.unique(label)) == {0, 10, 16, 255}  # palette indices, not colours
    stats = scan_labels(src, cache_dir=tmp_path)
    assert stats.pixels[0][16] >= 2048
    assert src.fold_classes(1) == ([c for c in range(1, 21) if not 6 <= c <= 10], [6, 7, 8, 9, 10])


def test_viton_lip_merge_and_hierarchy():
    root = need("viton_parsing")
    cfg = DataConfig(dataset="parsing", root=str(root), params={"preset": "lip"},
                     hierarchy={"head": ["hat", "hair", "face"], "body": ["upper-clothes", "dress", "coat",
                                "jumpsuits", "skirt"], "arms": ["arms"], "legs": ["pants", "legs", "shoes"]})
    src = build_source(cfg, "test")
    _, label = src.load(0)
    assert 15 not in label and 14 in label  # right-arm merged into arms
    areas = src.to_areas(label)
    assert set(np.unique(areas)) <= {0, 1, 2, 3, 4, 255} and (areas[label == 14] == 3).all()
    assert src.fold_classes(0)[1] == [6, 9, 12]
    bad = DataConfig(dataset="parsing", root=str(root), params={"preset": "lip"}, hierarchy={"head": ["hair"]})
    with pytest.raises(DataError, match="without an area"):
        build_source(bad, "test")
    twice = DataConfig(dataset="parsing", root=str(root), params={"preset": "lip"},
                       hierarchy={**cfg.hierarchy, "body": cfg.hierarchy["body"] + ["hair"]})
    with pytest.raises(DataError, match="puts class 'hair' in two areas: 'head' and 'body'"):
        build_source(twice, "test")


def test_a_flip_is_refused_where_left_and_right_stay_apart():
    # cv2.flip moves pixels, not ids: with LIP's left/right classes kept apart (a merge without the preset's pairs)
    # half of every arm, leg and shoe label trained as the wrong side, silently
    from fsskern.data.loader import EpisodeDataset
    from fsskern.data.transforms import TrainTransform
    root = need("viton_parsing")
    apart = build_source(DataConfig(dataset="parsing", root=str(root), params={"preset": "lip"},
                                    merge={"background": [3, 4, 8, 11]}), "train")
    with pytest.raises(DataError, match=r"left/right classes \[\('left-arm', 'right-arm'\)"):
        EpisodeDataset(apart, [], TrainTransform(65, flip=True), True)
    EpisodeDataset(apart, [], TrainTransform(65, flip=False), True)
    merged = build_source(DataConfig(dataset="parsing", root=str(root), params={"preset": "lip"}), "train")
    EpisodeDataset(merged, [], TrainTransform(65, flip=True), True)

def test_ccp_with_config_grouping():
    root = need("ccp")
    cfg = DataConfig(dataset="parsing", root=str(root), classes="class_index.tsv",
                     merge={"background": [0], "head": [19, 18], "skin": [41]}, folds=[[19]])
    src = build_source(cfg, "test")
    _, label = src.load(0)
    assert src.class_names[19] == "head" and 18 not in label


# ---- synthetic layouts -----------------------------------------------------------------------

def pascal_layout(tmp_path):
    root = tmp_path / "voc"
    ids = [f"2007_00000{i}" for i in range(6)]
    for k, sid in enumerate(ids):
        write_pair(root, sid, blocks(64, 80, (1 + k % 2, 0, 48, 0, 48), (6 if k < 3 else 0, 50, 64, 60, 80),
                                     (255, 48, 50, 0, 80)),
                   "JPEGImages", "SegmentationClassAug", palette=True)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train_aug.txt").write_text("\n".join(ids[:4]) + "\n")
    (lists / "val.txt").write_text("\n".join(ids[4:]) + "\n")
    return root, ids


def test_pascal_list_formats_and_policies(tmp_path):
    root, ids = pascal_layout(tmp_path)
    (root / "pairs.txt").write_text("".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in ids))
    (root / "hsnet.txt").write_text(f"{ids[0]}__01\n{ids[1]}__02\n{ids[0]}__06\n")
    src = build_source(DataConfig(dataset="pascal", root=str(root), train_list="pairs.txt"), "train")
    assert [src.sample_id(i) for i in range(len(src))] == ids
    hs = build_source(DataConfig(dataset="pascal", root=str(root), train_list="hsnet.txt"), "train")
    assert len(hs) == 2 and hs.listed_pairs == [(0, 1), (1, 2), (0, 6)]
    test = build_source(DataConfig(dataset="pascal", root=str(root)), "test")
    assert len(test) == 2
    stats = scan_labels(src, cache_dir=tmp_path / "c")
    assert stats.pixels[0] == {1: 48 * 48, 6: 14 * 20}
    pfenet = training_pools(src, stats, 1, "pfenet", min_pixels=100)   # fold 1: novel 6..10
    bam = training_pools(src, stats, 1, "bam", min_pixels=100)
    assert pfenet.train == {1: [0, 2, 4], 2: [1, 3, 5]} and pfenet.dropped == 0
    assert bam.train == {1: [4], 2: [3, 5]} and bam.dropped == 3  # images 0-2 hold class 6, novel in fold 1
    with pytest.raises(DataError, match="unknown training policy 'keep'"):
        training_pools(src, stats, 1, "keep")
    pf0 = training_pools(src, stats, 0, "pfenet", min_pixels=100)
    assert 6 in pf0.train and 1 not in pf0.train
    assert base_label_lut(pf0.base)[[0, 1, 6, 255]].tolist() == [0, 0, 1, 255]


def test_validation_classes_are_held_out_of_training_whole(tmp_path):
    """``val_classes``: base classes that validate as novel ones; no image holding any pixel of one trains,
    whatever the policy, and the bam policy's test-class drop still applies to their episodes."""
    root, ids = pascal_layout(tmp_path)  # image k: class 1 + k % 2 (48 x 48), class 6 (14 x 20) in images 0-2
    (root / "pairs.txt").write_text("".join(f"JPEGImages/{i}.jpg SegmentationClassAug/{i}.png\n" for i in ids))
    src = build_source(DataConfig(dataset="pascal", root=str(root), train_list="pairs.txt"), "train")
    stats = scan_labels(src, cache_dir=tmp_path / "c")
    pfenet = training_pools(src, stats, 1, "pfenet", min_pixels=100, val_classes=[2])
    assert pfenet.val == {2: [1, 3, 5]} and pfenet.train == {1: [0, 2, 4]} and 2 not in pfenet.base
    assert base_label_lut(pfenet.base)[[1, 2, 3, 11]].tolist() == [1, 0, 2, 5]  # base ids close up over the gap
    bam = training_pools(src, stats, 1, "bam", min_pixels=100, val_classes=[2])
    assert bam.val == {2: [3, 5]} and bam.train == {1: [4]}  # images 0-2 hold the test class 6
    # a validation class under min_pixels is no episode's, and its images still leave training
    small = training_pools(src, stats, 2, "pfenet", min_pixels=300, val_classes=[6])
    assert small.val == {} and small.train == {1: [4], 2: [3, 5]}
    with pytest.raises(DataError, match=r"val_classes \[6\] are not base classes"):
        training_pools(src, stats, 1, "pfenet", val_classes=[6])
    with pytest.raises(DataError, match="set one of them"):
        training_pools(src, stats, 1, "pfenet", val_fraction=0.1, val_classes=[2])


def test_pascal_bad_list_lines(tmp_path, monkeypatch):
    root, _ = pascal_layout(tmp_path)
    (root / "bad.txt").write_text("a b c\n")
    with pytest.raises(DataError, match="bad list line 'a b c'"):
        build_source(DataConfig(dataset="pascal", root=str(root), train_list="bad.txt"), "train")
    (root / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="empty image list file"):
        build_source(DataConfig(dataset="pascal", root=str(root), train_list="empty.txt"), "train")
    with pytest.raises(DataError, match="missing image list file"):
        build_source(DataConfig(dataset="pascal", root=str(root), train_list="nope.txt"), "train")
    # a relative root without the default list: the message names root/ImageSets/..., not root/root/ImageSets/...
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"missing image list file: elsewhere/ImageSets/Segmentation/train_aug\.txt"):
        build_source(DataConfig(dataset="pascal", root="elsewhere"), "train")
    with pytest.raises(DataError, match=r"missing image list file: elsewhere/lists/train\.txt"):
        build_source(DataConfig(dataset="coco", root="elsewhere"), "train")


def test_box_supports_from_voc_instance_maps_and_components(tmp_path):
    """PASCAL boxes come from SegmentationObject (one box per instance, even where instances touch),
    and from the class's connected components where an image has no instance map."""
    from fsskern.data.datasets.base import box_mask, component_boxes
    root, ids = pascal_layout(tmp_path)
    # an L of class 1 made of two touching instances (1 and 2), and an instance (3) of class 6
    # and a block of class 7 that no instance covers (SBD's labels can differ from VOC's instance maps)
    label = blocks(64, 80, (1, 0, 10, 0, 40), (1, 10, 40, 0, 10), (6, 50, 60, 60, 70), (255, 40, 41, 0, 80),
                   (7, 20, 30, 50, 60))
    write_pair(root, ids[4], label, "JPEGImages", "SegmentationClassAug", palette=True)
    objects = blocks(64, 80, (1, 0, 10, 0, 40), (2, 10, 40, 0, 10), (3, 50, 60, 60, 70), (255, 40, 41, 0, 80))
    write_pair(root, ids[4], objects, "JPEGImages", "SegmentationObject", palette=True)
    src = build_source(DataConfig(dataset="pascal", root=str(root)), "test")
    i = [src.sample_id(k) for k in range(len(src))].index(ids[4])
    _, lbl = src.load(i)
    assert src.instance_boxes(i, lbl, 1) == [(0, 0, 10, 40), (10, 0, 40, 10)]
    assert np.array_equal(box_mask(lbl.shape, src.instance_boxes(i, lbl, 1)), (lbl == 1).astype(np.int64))
    assert src.instance_boxes(i, lbl, 6) == [(50, 60, 60, 70)]
    assert src.instance_boxes(i, lbl, 7) == [(20, 50, 30, 60)]
    assert component_boxes(lbl == 1) == [(0, 0, 40, 40)]  # one component: its box would cover the L's gap
    j = 1 - i  # no instance map: the components of the class's pixels
    _, other = src.load(j)
    assert src.instance_boxes(j, other, 2) == [(0, 0, 48, 48)]
    assert component_boxes(np.zeros((4, 4), bool)) == []
    # two components, two boxes (one box around both would also cover the gap between them)
    assert component_boxes(blocks(8, 8, (1, 0, 2, 0, 2), (1, 5, 7, 5, 7)) == 1) == [(0, 0, 2, 2), (5, 5, 7, 7)]
    assert src.box_rule().startswith("SegmentationObject instance maps")
    bare = build_source(DataConfig(dataset="pascal", root=str(pascal_layout(tmp_path / "bare")[0])), "test")
    assert bare.box_rule() == "connected components (no SegmentationObject/ under the root)"
    objects[0, 0] = 0
    write_pair(root, ids[4], objects[:, :70], "JPEGImages", "SegmentationObject", palette=True)
    with pytest.raises(DataError, match="size mismatch"):
        src.instance_boxes(i, lbl, 1)


def test_bad_files_are_named(tmp_path):
    root, ids = pascal_layout(tmp_path)
    src = build_source(DataConfig(dataset="pascal", root=str(root)), "train")
    (root / "JPEGImages" / f"{ids[0]}.jpg").unlink()
    with pytest.raises(DataError, match=f"missing image file: .*{ids[0]}.jpg"):
        src.load(0)
    data = (root / "JPEGImages" / f"{ids[1]}.jpg").read_bytes()
    (root / "JPEGImages" / f"{ids[1]}.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"unreadable or truncated image file: .*{ids[1]}.jpg"):
        src.load(1)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "SegmentationClassAug" / f"{ids[2]}.png")
    with pytest.raises(DataError, match=f"size mismatch: .*{ids[2]}.jpg is 80x64.*is 10x10"):
        src.load(2)
    Image.fromarray(np.full((64, 80), 42, np.uint8)).save(root / "SegmentationClassAug" / f"{ids[3]}.png")
    with pytest.raises(DataError, match=rf"label value\(s\) \[42\] outside the dataset's classes in .*{ids[3]}.png"):
        src.load(3)
    (root / "SegmentationClassAug" / f"{ids[3]}.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"unreadable or truncated label file: .*{ids[3]}.png"):
        scan_labels(src, cache_dir=tmp_path / "c")
    with pytest.warns(UserWarning, match="skipped 1 of 4"):
        stats = scan_labels(src, cache_dir=tmp_path / "c", on_error="skip")
    assert list(stats.skipped) == [3] and "not a png" not in stats.skipped[3]
    with pytest.warns(UserWarning, match="skipped 4 of 4"):  # images checked too: missing, mismatch, truncated
        stats = scan_labels(src, cache_dir=tmp_path / "c", on_error="skip", check_images="decode")
    assert "missing image file" in stats.skipped[0] and "truncated" in stats.skipped[1]
    assert "size mismatch" in stats.skipped[2]
    with pytest.warns(UserWarning, match="skipped 3 of 4"):  # the header check cannot see truncation
        scan_labels(src, cache_dir=tmp_path / "c", on_error="skip", check_images="header")


def test_scan_in_worker_processes_matches(tmp_path):
    root, _ = pascal_layout(tmp_path)
    src = build_source(DataConfig(dataset="pascal", root=str(root)), "train")
    serial = scan_labels(src, cache_dir=tmp_path / "a")
    assert scan_labels(src, cache_dir=tmp_path / "b", workers=2).pixels == serial.pixels


def test_index_cache_is_keyed_by_list_and_mapping(tmp_path):
    root, ids = pascal_layout(tmp_path)
    cache = tmp_path / "c"
    src = build_source(DataConfig(dataset="pascal", root=str(root)), "train")
    first = scan_labels(src, cache_dir=cache)
    assert len(list(cache.iterdir())) == 1 and scan_labels(src, cache_dir=cache).pixels == first.pixels
    (root / "short.txt").write_text(ids[0] + "\n")
    other = build_source(DataConfig(dataset="pascal", root=str(root), train_list="short.txt"), "train")
    assert scan_labels(other, cache_dir=cache).key != first.key and len(list(cache.iterdir())) == 2


def test_index_cache_is_keyed_by_the_label_channel(tmp_path):
    # RGB-stored labels read from another channel used to be served the first channel's cached class index
    root = tmp_path / "rgb"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    label = np.zeros((64, 64, 3), np.uint8)
    label[:48, :48, 0], label[16:, 16:, 2] = 1, 2
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / "images" / "a.png")
    Image.fromarray(label).save(root / "labels" / "a.png")
    (root / "classes.tsv").write_text("0\tbackground\n1\tone\n2\ttwo\n")

    def scan(channel):
        cfg = DataConfig(dataset="folder", root=str(root), classes="classes.tsv", folds=[[1], [2]],
                         params={"label_channel": channel})
        return scan_labels(build_source(cfg, "train"), cache_dir=tmp_path / "c").pixels[0]
    assert set(scan(0)) == {1} and set(scan(2)) == {2}

def test_folder_names_image_types_it_does_not_read(tmp_path):
    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for name in ("a.png", "b.tif"):
        Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / "images" / name)
        Image.fromarray(np.ones((8, 8), np.uint8)).save(root / "labels" / (name[0] + ".png"))
    (root / "classes.tsv").write_text("0\tbackground\n1\tone\n")
    with pytest.warns(UserWarning, match=r"files of types \['.tif'\] are not read as images"):
        src = build_source(DataConfig(dataset="folder", root=str(root), classes="classes.tsv"), "train")
    assert [s[0] for s in src.samples] == ["a"]

def test_folder_list_refuses_an_id_with_two_image_files(tmp_path):
    """With a list file and no image_ext, a.jpg beside a.png: which one was read followed the directory order.
    A non-image file of the same stem (a.json) is no image."""
    root = tmp_path / "f"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / "images" / "a.png")
    (root / "images" / "a.json").write_text("{}")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(root / "labels" / "a.png")
    (root / "classes.tsv").write_text("0\tbackground\n1\tone\n")
    (root / "list.txt").write_text("a\n")
    cfg = DataConfig(dataset="folder", root=str(root), classes="classes.tsv",
                     params={"split_lists": {"train": "list.txt"}})
    assert build_source(cfg, "train").samples[0][1].endswith("a.png")
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(root / "images" / "a.jpg")
    with pytest.raises(DataError, match=r"id 'a' has several image files .*\(a.jpg, a.png\)"):
        build_source(cfg, "train")
    without_list = DataConfig(dataset="folder", root=str(root), classes="classes.tsv")  # every image of the folder
    with pytest.raises(DataError, match=r"id 'a' has several image files .*\(a.jpg, a.png\)"):
        build_source(without_list, "train")


def test_sixteen_bit_grey_images_are_scaled_as_cv2_reads_them(tmp_path):
    from fsskern.data.io import read_image
    grey = np.array([[0, 300, 65535, 32768]], np.uint16)
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png")[..., 0].tolist() == [[0, 1, 255, 128]]
    assert read_image(tmp_path / "g.png").shape == (1, 4, 3)
    Image.fromarray(np.ones((2, 2), np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(DataError, match="floating-point pixels"):
        read_image(tmp_path / "f.tif")


def test_index_cache_reads_a_label_rewritten_in_place_again(tmp_path):
    """A label overwritten under its own name (a re-run converter, a fixed annotation) must not be served from
    the cache: its image would keep classes it no longer holds and be drawn as a support without them."""
    root, _ = pascal_layout(tmp_path)
    cache = tmp_path / "c"
    src = build_source(DataConfig(dataset="pascal", root=str(root)), "train")
    first = scan_labels(src, cache_dir=cache)
    labels = sorted((root / "SegmentationClassAug").iterdir())
    i = next(k for k, s in enumerate(src.samples) if Path(s[2]) == labels[0])
    Image.fromarray(np.zeros_like(np.array(Image.open(labels[0])))).save(labels[0])  # every class gone
    again = scan_labels(src, cache_dir=cache)
    assert first.pixels[i] and again.pixels[i] == {} and again.key != first.key


def test_episodes_do_not_depend_on_where_the_data_is(tmp_path):
    """The episode key (and so every manifest) is the same for a copy of the data elsewhere and for any
    spelling of its root; the cache keeps the copies apart; other labels give another key."""
    root, _ = pascal_layout(tmp_path / "a")
    copy = tmp_path / "b" / "voc"
    shutil.copytree(root, copy)
    cache = tmp_path / "c"

    def stats(r):
        return scan_labels(build_source(DataConfig(dataset="pascal", root=str(r)), "train"), cache_dir=cache)

    first = stats(root)
    assert stats(copy).key == first.key == stats(os.path.relpath(root)).key
    assert len(list(cache.iterdir())) == 2  # one entry per copy, one for both spellings of the first
    labels = sorted((copy / "SegmentationClassAug").iterdir())
    shutil.copy(labels[1], labels[0])  # another image's classes under the same name
    shutil.rmtree(cache)
    assert stats(copy).key != first.key


def test_unknown_names_are_refused(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'voc'"):
        build_source(DataConfig(dataset="voc", root=str(tmp_path)), "train")
    root, _ = pascal_layout(tmp_path)
    with pytest.raises(DataError, match=r"unknown data.params for dataset 'pascal': \['typo'\]"):
        build_source(DataConfig(dataset="pascal", root=str(root), params={"typo": 1}), "train")
    with pytest.raises(DataError, match="unknown COCO fold convention 'odd'"):
        coco_novel_classes(0, "odd")


def test_coco_fold_conventions():
    inter = [coco_novel_classes(k, "interleaved") for k in range(4)]
    cont = [coco_novel_classes(k, "contiguous") for k in range(4)]
    assert inter[0][:3] == [1, 5, 9] and inter[3][-1] == 80 and cont[1] == list(range(21, 41))
    for folds in (inter, cont):
        assert sorted(c for f in folds for c in f) == list(range(1, 81)) and all(len(f) == 20 for f in folds)


def test_coco_canet_class_protocol(tmp_path):
    """CANet's 40 / 20 / 20 class protocol (CRCNet Tab. 13): our published seeded split, one fold, base = the
    40 training classes, novel = the test classes on "test", the validation ones on "val", both on "train"."""
    from fsskern.data.datasets.coco import CANET_SPLIT
    # the hard-coded lists are the split; this redraw documents where they came from (NumPy may one day
    # change its Generator streams: then this line, not the split, is what changes)
    drawn = np.random.Generator(np.random.PCG64(2019)).permutation(80) + 1
    assert [sorted(drawn[a:b].tolist()) for a, b in ((0, 40), (40, 60), (60, 80))] == \
        [CANET_SPLIT[g] for g in ("train", "val", "test")]
    root = tmp_path / "coco"
    train_c, val_c, test_c = (CANET_SPLIT[g][0] for g in ("train", "val", "test"))
    # training images: a training class alone, with a val class, with a test class; the test list: a test class
    labels = {"a": [(train_c, 0, 16, 0, 16)], "c": [(train_c, 0, 16, 0, 16), (val_c, 16, 32, 0, 16)],
              "d": [(train_c, 0, 16, 0, 16), (test_c, 16, 32, 16, 32)], "b": [(test_c, 0, 16, 0, 16)]}
    for sid, regions in labels.items():
        write_pair(root, sid, blocks(32, 32, *regions), "images", "annotations")
    (root / "lists").mkdir()
    for name, ids in (("train", "acd"), ("val", "b")):
        (root / "lists" / f"{name}.txt").write_text("".join(f"images/{i}.jpg annotations/{i}.png\n" for i in ids))
    cfg = DataConfig(dataset="coco", root=str(root), fold_convention="canet")
    test, train = build_source(cfg, "test"), build_source(cfg, "train")
    assert test.num_folds == 1 and test.fold_classes(0) == (CANET_SPLIT["train"], CANET_SPLIT["test"])
    assert build_source(cfg, "val").fold_classes(0)[1] == CANET_SPLIT["val"]
    assert train.fold_classes(0)[1] == sorted(CANET_SPLIT["val"] + CANET_SPLIT["test"])
    stats = scan_labels(train, cache_dir=tmp_path / "idx")
    bam = training_pools(train, stats, 0, "bam", min_pixels=16)
    assert bam.train == {train_c: [0]} and bam.dropped == 2  # val- and test-class images both dropped
    assert training_pools(train, stats, 0, "pfenet", min_pixels=16).train == {train_c: [0, 1, 2]}
    with pytest.raises(DataError, match="fold 1 out of range"):
        test.fold_classes(1)
    (root / "classes.txt").write_text("0\tbackground\n1\tcat\n2\tdog\n")
    with pytest.raises(DataError, match="canet class protocol splits the 80 COCO classes; .* has 2"):
        build_source(cfg, "test")
    # the 80 names one a line (no ids) used to be numbered from 0: person dropped as background, every name moved
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in COCO_CLASSES))
    assert build_source(cfg, "test").class_names == ["background", *COCO_CLASSES]


def test_fss1000_layout(tmp_path):
    root = tmp_path / "fss"
    names = {"trn": ["bee", "ant"], "val": ["cat"], "test": ["eel", "dog"]}  # numbered sorted, as HSNet does
    (root / "splits").mkdir(parents=True)
    for split, ns in names.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(ns) + "\n")
        for n in ns:
            for k in range(1, 4):
                write_pair(root, str(k), blocks(32, 32, (200, 0, 16, 0, 16), (100, 16, 32, 0, 32)), n, n)
    src = build_source(DataConfig(dataset="fss1000", root=str(root)), "test")
    assert src.class_names == ["background", "ant", "bee", "cat", "dog", "eel"] and len(src) == 6
    _, label = src.load(4)  # eel/2
    assert src.sample_id(4) == "eel/2" and set(np.unique(label)) == {0, 5} and (label == 5).sum() == 256
    assert src.fold_classes(0) == ([1, 2], [4, 5])
    (root / "splits").rename(root / "hsnet_splits")  # a relative split_dir: under the root, as the list paths
    moved = build_source(DataConfig(dataset="fss1000", root=str(root), params={"split_dir": "hsnet_splits"}), "test")
    assert moved.class_names == src.class_names and len(moved) == 6
    (root / "hsnet_splits").rename(root / "splits")
    many = tmp_path / "many"
    (many / "splits").mkdir(parents=True)
    (many / "splits" / "trn.txt").write_text("".join(f"c{k}\n" for k in range(300)))
    (many / "splits" / "val.txt").write_text("v\n")
    (many / "splits" / "test.txt").write_text("t\n")
    write_pair(many, "1", blocks(8, 8, (255, 0, 4, 0, 4)), "t", "t")
    big = build_source(DataConfig(dataset="fss1000", root=str(many)), "test")
    numbered = sorted(f"c{k}" for k in range(300))  # HSNet's order
    assert big.class_names[255] is None and big.class_names[256] == numbered[254] and big.fold_classes(0)[1] == [303]
    assert set(np.unique(big.load(0)[1])) == {0, 303}  # class ids skip 255, which stays ignore
    (root / "ant" / "2.png").unlink()
    with pytest.raises(DataError, match="missing label file: .*ant/2.png"):
        build_source(DataConfig(dataset="fss1000", root=str(root)), "train").load(1)


def test_fss1000_recipe_tests_and_trains_on_every_image(tmp_path):
    """CRCNet's FSS-1000 recipe (notes #25: 10 episodes per test class) gives every test image one episode as
    the query, small objects included; PFENet's 2,048-pixel rule would drop them (two of the official example
    masks are under it)."""
    from fsskern.data.protocols import build_test_manifest
    from fsskern.engine.config import load_config
    root = tmp_path / "fss"
    (root / "splits").mkdir(parents=True)
    for split, names in {"trn": ["ant"], "val": ["bee"], "test": ["dog", "eel"]}.items():
        (root / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for n in names:
            for k in range(1, 11):
                side = 30 if k % 3 == 0 else 100  # 900-pixel objects in images 3, 6, 9
                write_pair(root, str(k), blocks(224, 224, (255, 10, 10 + side, 20, 20 + side)), n, n)
    recipe = Path(__file__).parents[1] / "configs" / "crcnet" / "fss1000_resnet50_1shot.yaml"
    cfg = load_config(recipe, [f"data.root={root}", "eval.episodes=20"])
    source = build_source(cfg.data, "test")
    stats = scan_labels(source, cache_dir=tmp_path / "idx")
    queries = lambda protocol: [e.query for e in build_test_manifest(  # noqa: E731
        source, stats, cfg.data.fold, 1, 1, protocol, cfg.eval.seeds[0], 20).episodes]
    assert sorted(queries(cfg.eval.protocol)) == list(range(20))
    assert len(set(queries("pfenet"))) == 14  # the six 900-pixel objects never queried
    # training too takes the small objects (notes 1.4: every image of the 520 classes)
    train = build_source(cfg.data, "train")
    pools = training_pools(train, scan_labels(train, cache_dir=tmp_path / "idx"), cfg.data.fold,
                           cfg.data.train_policy, cfg.data.min_pixels)
    assert sum(len(v) for v in pools.train.values()) == 10


def test_fss1000_official_test_list_reads():
    root = need("fss1000_example")
    names = (root / "fss_test_set.txt").read_text().split()
    assert len(names) == 240


def test_atr_popnet_layout_pools_and_merge(tmp_path):
    root = tmp_path / "ATR_OS"
    (root / "list").mkdir(parents=True)
    ids = [f"img{i}" for i in range(8)]
    for k, sid in enumerate(ids):
        write_pair(root, sid, blocks(40, 30, (2, 0, 10, 0, 30), (10, 30, 40, 0, 15), (9, 30, 40, 15, 30),
                                     (13, 20, 30, 0, 15), (3, 10, 12, 0, 5)), "trainval_images", "trainval_classes")
    (root / "list" / "meta_train_id.txt").write_text("\n".join(ids) + "\n")
    (root / "list" / "meta_test_id.txt").write_text("\n".join(ids) + "\n")
    cfg = DataConfig(dataset="parsing", root=str(root), params={"layout": "popnet", "preset": "atr",
                                                                 "fold_protocol": "paper", "pool_boundary": 2})
    src = build_source(cfg, "train")
    assert src.query_pool == [0, 1, 2] and src.support_pool == [3, 4, 5, 6, 7]
    _, label = src.load(0)
    assert set(np.unique(label)) == {0, 2, 9, 12}  # shoes merged to 9, right-leg to 12, sunglasses to bg
    assert src.fold_classes(0) == ([1, 2, 4, 5, 7, 11, 14, 16], [6, 9, 12])
    # an id listed twice is one sample (else a query could be its own support), kept where first seen
    (root / "list" / "meta_train_id.txt").write_text("\n".join(ids[:3] + ids[:1] + ids[3:]) + "\n")
    assert [s[0] for s in build_source(cfg, "train").samples] == ids
    code = DataConfig(dataset="parsing", root=str(root), params={"layout": "popnet", "preset": "atr"})
    with pytest.raises(DataError, match="pool_boundary 200 leaves no support pool in a 8-image list"):
        build_source(code, "test")  # the code's test boundary (200) needs the full 2706-line list
    code.params["pool_boundary"] = 2
    assert build_source(code, "test").fold_classes(1)[1] == [1, 4, 16]
    with pytest.raises(DataError, match="preset 'lip' has no 'paper' folds"):
        build_source(DataConfig(dataset="parsing", root=str(root), params={"layout": "popnet", "preset": "lip",
                                                                             "fold_protocol": "paper"}), "test")


@pytest.mark.parametrize("name, fold1_novel", [("lip_os", [5, 7, 10]), ("cihp_os", [1, 5, 7])])
def test_lip_and_cihp_os_presets_on_the_popnet_layout(tmp_path, name, fold1_novel):
    """configs/data/{lip,cihp}_os.yaml on a small tree in the code's layout: the code's merge and folds (notes 1.5,
    8.3) and a complete area hierarchy."""
    import yaml
    section = yaml.safe_load((Path(__file__).parents[1] / "configs" / "data" / f"{name}.yaml").read_text())["data"]
    root = tmp_path / name.upper()
    (root / "list").mkdir(parents=True)
    ids = [f"img{i}" for i in range(6)]
    for sid in ids:  # 6 dress, 17 right-leg, 19 right-shoe, 4 sunglasses, 11 scarf
        write_pair(root, sid, blocks(40, 30, (6, 0, 10, 0, 30), (17, 10, 20, 0, 15), (19, 20, 30, 0, 15),
                                     (4, 30, 35, 0, 5), (11, 35, 40, 0, 5)), "trainval_images", "trainval_classes")
    (root / "list" / "meta_train_id.txt").write_text("\n".join(ids) + "\n")
    (root / "list" / "meta_test_id.txt").write_text("\n".join(ids) + "\n")
    cfg = DataConfig(**{**section, "root": str(root), "params": {**section["params"], "pool_boundary": 2}})
    src = build_source(cfg, "train")
    _, label = src.load(0)
    assert set(np.unique(label)) == {0, 6, 16, 18}  # left/right merged, sunglasses and scarf to background
    assert src.fold_classes(0)[1] == [6, 9, 12] and src.fold_classes(1)[1] == fold1_novel
    assert len(src.foreground_classes()) == cfg.ways == 12 and src.area_lut is not None
    # stage 1's person comes from the raw label (notes A2): sunglasses and scarf stay part of it
    _, same, person = src.load_with_person(0)
    assert np.array_equal(same, label) and (person[30:40, :5] == 1).all() and (label[30:40, :5] == 0).all()
    assert person.sum() == 40 * 30 - 20 * 15 - 10 * 25 and (person[10:40, 15:] == 0).all()
    from fsskern.data.episodes import parsing_train_episodes
    from fsskern.data.loader import EpisodeDataset
    from fsskern.data.transforms import TrainTransform
    base, novel = src.fold_classes(0)
    pools = training_pools(src, scan_labels(src, cache_dir=tmp_path / "idx"), 0, "pfenet", 1).train
    episodes = parsing_train_episodes(src, pools, {"s": 0}, shots=1, ways=1)
    whole = TrainTransform(40, scale=(1.0, 1.0), rotate=0.0, blur=False)  # the 40 x 30 image padded to 40 x 40
    b = EpisodeDataset(src, episodes, whole, True, base=base, novel=novel)[0]
    assert int((b["query_human"] == 1).sum()) == int((b["support_human"] == 1).sum()) == person.sum()


def test_pseudo_folder_span_filter(tmp_path):
    root = tmp_path / "pseudo"
    write_pair(root, "a", blocks(100, 100, (1, 0, 100, 0, 50), (2, 10, 60, 60, 100)), "images", "pseudo")
    write_pair(root, "b", blocks(100, 100, (2, 0, 40, 0, 40)), "images", "pseudo")
    (root / "index.json").write_text(json.dumps({"version": 1, "num_clusters": 3, "samples": ["a", "b"]}))
    src = build_source(DataConfig(dataset="pseudo", root=str(root)), "train")
    stats = scan_labels(src, cache_dir=tmp_path / "c")
    # clusters 0 and 1 (classes 1, 2) span every row: "stuff", dropped; cluster 2 (class 3) survives
    assert stats.pixels == [{3: 2000}, {3: 1600}]
    (root / "index.json").write_text("{}")
    with pytest.raises(DataError, match="bad pseudo-label index"):
        build_source(DataConfig(dataset="pseudo", root=str(root)), "train")
    # cluster 254 would be class 255, the ignore value, and drop out silently
    (root / "index.json").write_text(json.dumps({"version": 1, "num_clusters": 255, "samples": ["a", "b"]}))
    with pytest.raises(DataError, match="num_clusters 255, not in 1..254"):
        build_source(DataConfig(dataset="pseudo", root=str(root)), "train")


def test_folder_test_fraction_splits_the_images(tmp_path):
    """params.test_fraction: a hashed, disjoint test / train split of one folder (the parsing sets' protection
    against test queries that are training images); val is drawn from train with its own, unsalted hash."""
    from fsskern.data.index import held_out
    root = tmp_path / "set"
    ids = [f"img{i:03d}" for i in range(60)]
    for sid in ids:
        write_pair(root, sid, blocks(8, 8, (1, 0, 4, 0, 8)))
    (root / "classes.txt").write_text("background\nthing\n")
    kw = dict(dataset="folder", root=str(root), classes="classes.txt")
    split = {s: [src.sample_id(i) for i in range(len(src))]
             for s in ("train", "val", "test")
             for src in [build_source(DataConfig(**kw, params={"test_fraction": 0.5}), s)]}
    assert split["train"] == split["val"] and not set(split["train"]) & set(split["test"])
    assert sorted(split["train"] + split["test"]) == ids and 15 < len(split["test"]) < 45
    assert split["test"] == [i for i in ids if held_out(i, 0.5, salt="test:")]  # the same images on every machine
    assert any(held_out(i, 0.2) for i in split["train"])  # the val hold-out is not emptied by the test split
    for bad in (0, 1, 1.5):
        with pytest.raises(DataError, match="test_fraction"):
            build_source(DataConfig(**kw, params={"test_fraction": bad}), "test")


PRESETS = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "data").glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_data_presets(name):
    """Every preset is a valid DataConfig; the ones on ../shared/data build their source and folds."""
    import yaml
    repo = Path(__file__).parents[1]
    section = yaml.safe_load((repo / "configs" / "data" / f"{name}.yaml").read_text())["data"]
    cfg = DataConfig(**section)
    if not cfg.root.startswith("../shared/data"):
        return
    cfg.root = str(repo / cfg.root)
    if not Path(cfg.root).is_dir():
        pytest.skip(f"real data {cfg.root} absent")
    src = build_source(cfg, "test")
    for fold in range(src.num_folds):
        base, novel = src.fold_classes(fold)
        assert novel and not set(base) & set(novel)
    if src.name == "parsing" and cfg.hierarchy:
        assert src.area_lut is not None


def test_bam_class_lists_read_safely_and_compare(tmp_path):
    from fsskern.data.index import class_index_from_lists, compare_indexes
    root, ids = pascal_layout(tmp_path)
    src = build_source(DataConfig(dataset="pascal", root=str(root)), "train")
    lists = {1: [[f"JPEGImages/{ids[0]}.jpg", f"SegmentationClassAug/{ids[0]}.png"]],
             2: [[f"JPEGImages/{ids[1]}.jpg", f"SegmentationClassAug/{ids[1]}.png"],
                 [f"JPEGImages/{ids[3]}.jpg", f"SegmentationClassAug/{ids[3]}.png"]]}
    (tmp_path / "sub.txt").write_text(repr(lists))
    theirs = class_index_from_lists(src, tmp_path / "sub.txt")
    assert theirs == {1: [0], 2: [1, 3]}
    ours = scan_labels(src, cache_dir=tmp_path / "c").class_index(2048)
    assert compare_indexes(ours, theirs) == {1: ([2], [])}  # image 2 holds class 1 too; the list misses it
    (tmp_path / "evil.txt").write_text("__import__('os').system('true')")
    with pytest.raises(DataError, match="not a Python dict literal"):
        class_index_from_lists(src, tmp_path / "evil.txt")
    (tmp_path / "other.txt").write_text(repr({1: [["JPEGImages/x.jpg", "SegmentationClassAug/x.png"]]}))
    with pytest.raises(DataError, match="names 1 image.* \\(first: 'x'\\)"):
        class_index_from_lists(src, tmp_path / "other.txt")


def test_class_table_keeps_spaces_in_tab_separated_names(tmp_path):
    """prepare_data.py writes COCO's classes.txt as "id<TAB>name": "traffic light" and the two "baseball ..."
    classes must keep their whole names (a whitespace split had made two classes "baseball")."""
    from fsskern.data.io import read_class_table
    (tmp_path / "classes.txt").write_text("0\tbackground\n10\ttraffic light\n39\tbaseball bat\n40\tbaseball glove\n")
    assert read_class_table(tmp_path / "classes.txt") == {0: "background", 10: "traffic light",
                                                         39: "baseball bat", 40: "baseball glove"}
    (tmp_path / "counts.tsv").write_text("label_value\tclass\timages\n1\tbuilding\t150\n")  # MSRC-v2's columns
    assert read_class_table(tmp_path / "counts.tsv") == {1: "building"}
    (tmp_path / "spaced.txt").write_text("1 cow 24\n2 sheep 30\n")
    assert read_class_table(tmp_path / "spaced.txt") == {1: "cow", 2: "sheep"}
    (tmp_path / "names.txt").write_text("background\ncow\nsheep\n")  # one name a line
    assert read_class_table(tmp_path / "names.txt") == {0: "background", 1: "cow", 2: "sheep"}
    # a table with one bad row is refused, not read as a list of names (every name a line off, the header a class)
    for bad in ("2\t", "-1\tvoid"):
        (tmp_path / "bad.txt").write_text(f"id\tname\n0\tbackground\n1\tcat\n{bad}\n3\tdog\n")
        with pytest.raises(DataError, match="is not 'id<TAB>name'"):
            read_class_table(tmp_path / "bad.txt")


def test_a_folder_class_with_the_ignore_id_is_refused():
    """Class 255 of a 16-bit label table would read as ignore everywhere: never trained, never tested."""
    from fsskern.data.datasets.folder import merged_lut
    names = {i: f"c{i}" for i in range(300)}
    with pytest.raises(DataError, match="names id 255"):
        merged_lut(names, None)
    class_names, lut = merged_lut(names, None, void=[255])
    assert lut[255] == 255 and class_names[255] is None and lut[256] == 256
