"""COCO instances JSON -> PNG conversion (real minicoco files and a hand-made JSON pinning the
overlap and crowd rules), the COCO source on the converted files, and prepare_data's list builders."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_script
from fsskern.data import DataError, build_source
from fsskern.data.datasets.coco import convert_instances
from fsskern.engine.config import DataConfig

pytest.importorskip("pycocotools")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools on numpy 2
DATA = Path(__file__).parents[1].parent / "shared" / "data"
REPO = Path(__file__).parents[1]


def test_overlap_and_crowd_rules(tmp_path):
    big = [[0, 0, 40, 0, 40, 40, 0, 40]]              # class 7 (rank 1), area 1600
    small = [[10, 10, 20, 10, 20, 20, 10, 20]]        # class 9 (rank 2), area 100, inside big
    crowd = {"counts": [30 * 50 + 0, 10 * 50], "size": [50, 50]}  # column-major RLE: columns 30..39 crowd
    ann = {"images": [{"id": 1, "file_name": "a.jpg", "height": 50, "width": 50}],
           "categories": [{"id": 9, "name": "nine"}, {"id": 7, "name": "seven"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "segmentation": small, "area": 100, "iscrowd": 0,
                            "bbox": [10, 10, 10, 10]},
                           {"id": 2, "image_id": 1, "category_id": 7, "segmentation": big, "area": 1600, "iscrowd": 0,
                            "bbox": [0, 0, 40, 40]},
                           {"id": 3, "image_id": 1, "category_id": 7, "segmentation": crowd, "area": 500, "iscrowd": 1,
                            "bbox": [30, 0, 10, 50]}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    summary = convert_instances(tmp_path / "ann.json", tmp_path / "png")
    label = np.array(Image.open(tmp_path / "png" / "a.png"))
    assert summary["classes"] == {1: "seven", 2: "nine"}
    assert label[15, 15] == 2            # the smaller instance wins where both are painted
    assert label[5, 5] == 1 and label[35, 35] == 1  # crowd never erases an instance
    assert label[45, 35] == 255 and label[45, 5] == 0  # crowd -> ignore where no instance is
    assert json.loads((tmp_path / "png" / "conversion.json").read_text())["converter_version"] == 1


def test_minicoco_real_conversion_and_source(tmp_path):
    src_dir = DATA / "minicoco"
    if not src_dir.is_dir():
        pytest.skip(f"real data {src_dir} absent")
    import runpy
    import sys
    root = tmp_path / "coco"
    root.mkdir()
    (root / "train2017").symlink_to(src_dir / "images")
    argv = sys.argv
    try:
        sys.argv = ["prepare_data.py", "coco", "--json", str(src_dir / "annotations" / "train.json"), "--root",
                    str(root), "--split", "train2017", "--list-name", "train.txt",
                    "--image-dir", str(root / "train2017")]  # a link inside the root to another disk's folder
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(REPO / "python" / "prepare_data.py"), run_name="__main__")
        assert done.value.code == 0
    finally:
        sys.argv = argv
    src = build_source(DataConfig(dataset="coco", root=str(root)), "train")
    assert len(src) == 30 and src.class_names == ["background", "person", "car", "airplane"]
    values = set()
    for i in range(len(src)):
        image, label = src.load(i)
        values |= set(np.unique(label).tolist())
    assert values == {0, 1, 2, 3, 255}  # minicoco has crowd regions
    assert src.fold_classes(0) == ([2, 3], [1])
    with pytest.raises(DataError, match="fold 3 has no novel class"):
        src.fold_classes(3)
    contiguous = build_source(DataConfig(dataset="coco", root=str(root), fold_convention="contiguous"), "train")
    with pytest.raises(DataError, match="fold 0 has no novel class"):
        contiguous.fold_classes(0)  # 3 classes cannot make 4 contiguous blocks


def test_prepare_sbd_merge_and_fss_split(tmp_path):
    prep = load_script(REPO / "python" / "prepare_data.py")
    assert prep.merge_sbd(["a", "b", "e"], ["b", "c", "a", "d"], ["v"]) == ["b", "c", "a", "d", "e"]  # PFENet's order
    with pytest.raises(SystemExit, match="1 training ids are VOC val images"):
        prep.merge_sbd(["a"], ["v"], ["v"])
    classes = [f"c{i}" for i in range(1000)]
    split = prep.fss_split(classes, classes[:240])
    assert [len(split[s]) for s in ("trn", "val", "test")] == [520, 240, 240]
    assert not set(split["trn"]) & set(split["val"]) and split == prep.fss_split(classes, classes[:240])
