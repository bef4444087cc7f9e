"""Build the files the data sources read, from the original downloads (nothing is downloaded here).

  sbd      VOC2012 train (1,464) + SBD train_noval (5,623) -> order-preserving dedup -> train_aug.txt
           (PFENet's voc_sbd_merge_noduplicate list: 5,953 ids; asserted, with val.txt = 1,449,
           when the full lists are given)
  coco     COCO instances JSON -> PNG label maps (fsskern.data.datasets.coco rules) + a pair list of the
           images holding at least one annotation (PFENet's lists: 82,081 train2014 / 40,137 val2014,
           asserted when the JSON is the full COCO2014 split)
  fss1000  class split files splits/{trn,val,test}.txt: the official 240 test classes, the other 760
           split 520/240 (HSNet's files can be given instead with --hsnet-splits)

Run ``python python/prepare_data.py <command> -h`` for the arguments. Every command prints what it
wrote with the sha256 of each list so two machines can compare their data."""
import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FULL = {"voc_train": 1464, "sbd_train_noval": 5623, "train_aug": 5953, "val": 1449,
        "train2014": (82783, 82081), "val2014": (40504, 40137), "fss_classes": 1000}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_ids(path: Path) -> list:
    from fsskern.data.io import read_lines
    return [ln.split()[0].split("/")[-1].split(".")[0] for ln in read_lines(path, "id list")]


def write_list(path: Path, lines: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(ln + "\n" for ln in lines))
    print(f"wrote {path}: {len(lines)} lines, sha256 {sha(path)}")


def merge_sbd(voc_train: list, sbd: list, val: list) -> list:
    """SBD train_noval then VOC train, first occurrence kept: PFENet's voc_sbd_merge_noduplicate.txt (its
    duplicate_removal.py over the merged list) starts with SBD's 2008_000008 and has VOC train's 2007 ids after
    SBD's 5,623. The order is the sample order, which the episodes and the held-out images follow. Val ids out."""
    val_set = set(val)
    merged = list(dict.fromkeys(sbd + voc_train))
    leaked = [i for i in merged if i in val_set]
    if leaked:
        raise SystemExit(f"{len(leaked)} training ids are VOC val images (first: {leaked[0]}); wrong SBD list?")
    return merged


def cmd_sbd(a):
    voc = Path(a.voc_root)
    seg = voc / "ImageSets" / "Segmentation"
    voc_train, val = read_ids(seg / "train.txt"), read_ids(seg / "val.txt")
    sbd = read_ids(Path(a.sbd_list))
    merged = merge_sbd(voc_train, sbd, val)
    if len(voc_train) == FULL["voc_train"] and len(sbd) == FULL["sbd_train_noval"]:
        assert len(merged) == FULL["train_aug"], f"merged list has {len(merged)} ids, expected 5,953"
        assert len(val) == FULL["val"], f"val.txt has {len(val)} ids, expected 1,449"
    else:
        print(f"partial lists ({len(voc_train)} VOC train, {len(sbd)} SBD): known counts not asserted")
    write_list(Path(a.out or seg / "train_aug.txt"), merged)


def cmd_coco(a):
    from fsskern.data.datasets.coco import convert_instances
    from pycocotools.coco import COCO
    import contextlib
    import io
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(a.json)
    root = Path(a.root)
    image_dir = Path(a.split)  # the list's image paths are relative to the root: checked before converting
    if a.image_dir:  # by path, not resolved: <root>/train2014 may link to another disk
        inside, top = Path(os.path.abspath(a.image_dir)), Path(os.path.abspath(root))
        if not inside.is_relative_to(top):
            raise SystemExit(f"--image-dir {a.image_dir} must lie inside --root {a.root}: the pair list names "
                             f"images relative to the root")
        image_dir = inside.relative_to(top)
    images = sorted(coco.getImgIds())
    annotated = [i for i in images if coco.getAnnIds(imgIds=i, iscrowd=None)]
    full = FULL.get(a.split)
    if full and len(images) == full[0]:
        assert len(annotated) == full[1], f"{len(annotated)} annotated {a.split} images, expected {full[1]}"
    label_dir = root / "annotations" / a.split
    summary = convert_instances(a.json, label_dir, annotated if a.annotated_only else images)
    names = [summary["classes"][k] for k in sorted(summary["classes"])]
    (root / "classes.txt").write_text("".join(f"{k}\t{n}\n" for k, n in enumerate(["background"] + names)))
    pairs = []
    for i in annotated:
        stem = Path(coco.loadImgs(i)[0]["file_name"]).stem
        pairs.append(f"{image_dir.as_posix()}/{stem}.jpg annotations/{a.split}/{stem}.png")
    write_list(root / "lists" / a.list_name, pairs)
    print(json.dumps({k: summary[k] for k in ("converter_version", "images", "crowd_pixels")}))


def fss_split(all_classes: list, test: list) -> dict:
    """Official test classes; the rest ordered by sha256 of the name, first 520 trn, the others val."""
    test_set = set(test)
    missing = [c for c in test if c not in set(all_classes)]
    if missing:
        raise SystemExit(f"official test classes missing from the dataset folder: {missing[:5]}")
    rest = sorted((c for c in all_classes if c not in test_set), key=lambda c: hashlib.sha256(c.encode()).hexdigest())
    n_trn = round(len(rest) * 520 / 760)
    return {"trn": sorted(rest[:n_trn]), "val": sorted(rest[n_trn:]), "test": list(test)}


def cmd_fss1000(a):
    root = Path(a.root)
    out = Path(a.out or root / "splits")
    if a.hsnet_splits:
        for s in ("trn", "val", "test"):
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(a.hsnet_splits) / f"{s}.txt", out / f"{s}.txt")
            print(f"copied {out / (s + '.txt')}, sha256 {sha(out / (s + '.txt'))}")
        return
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != out.name)
    split = fss_split(classes, Path(a.test_list).read_text().split())
    if len(classes) == FULL["fss_classes"]:
        assert [len(split[s]) for s in ("trn", "val", "test")] == [520, 240, 240]
    for s, names in split.items():
        write_list(out / f"{s}.txt", names)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sbd", help="PASCAL train_aug list (VOC train + SBD train_noval, deduplicated)")
    s.add_argument("--voc-root", required=True, help="VOC2012 folder with ImageSets/Segmentation/{train,val}.txt")
    s.add_argument("--sbd-list", required=True, help="SBD train_noval.txt (or PFENet's sbd_data.txt)")
    s.add_argument("--out", help="default: <voc-root>/ImageSets/Segmentation/train_aug.txt")
    s.set_defaults(func=cmd_sbd)
    c = sub.add_parser("coco", help="COCO instances JSON -> PNG label maps + pair list")
    c.add_argument("--json", required=True, help="e.g. annotations/instances_train2014.json")
    c.add_argument("--root", required=True, help="COCO root (data.root): PNGs go to annotations/<split>/")
    c.add_argument("--split", required=True, help="image folder name, e.g. train2014 or val2014")
    c.add_argument("--image-dir", help="image folder if not <root>/<split>")
    c.add_argument("--list-name", required=True, help="list file under <root>/lists/: train.txt or val.txt")
    c.add_argument("--annotated-only", action="store_true", help="write PNGs only for images in the list")
    c.set_defaults(func=cmd_coco)
    f = sub.add_parser("fss1000", help="FSS-1000 class split files")
    f.add_argument("--root", required=True, help="FSS-1000 folder with one sub-folder per class")
    f.add_argument("--test-list", help="the official fss_test_set.txt (240 classes)")
    f.add_argument("--hsnet-splits", help="HSNet's data/splits/fss folder: copied as they are")
    f.add_argument("--out", help="default: <root>/splits")
    f.set_defaults(func=cmd_fss1000)
    a = p.parse_args(argv)
    if a.command == "fss1000" and not (a.test_list or a.hsnet_splits):
        p.error("fss1000 needs --test-list or --hsnet-splits")
    from fsskern.data import DataError
    try:
        a.func(a)
    except (DataError, OSError) as e:  # a path of the user's: its name, not a traceback (as train.py)
        print(f"prepare_data {a.command}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
