"""Seeded label lists for UMTFSS stage C (fine-tuning with few labels):
python python/make_label_lists.py CONFIG OUT_DIR [key=value ...] [--ratios 5 10 20 100] [--seed 0] [--fold F]

Writes OUT_DIR/train_<r>.txt for each ratio r (one image id a line, in the source's order): the first
floor(r % x n) images (at least 1) of one seeded permutation of the n training images, so the lists are nested
(5 % within 10 % within 20 %) and the same seed gives the same files. The UMTFSS code's lists are random subsets
of the whole training list (PASCAL 297 / 595 / 1,190 of 5,953, floor), each fold keeping the images with base
classes when it reads them; without --fold this is that.

--fold F counts only the fold's training images: those without a pixel of the fold's novel classes (the bam
policy; the code's 'fold' setting chooses U_train from the ground truth the same way). Labels are read for that
choice only. MSRC-v2 (every split holds every image) needs it: its 100 % list is also the unlabelled image set of
stage A / B, which must not hold the fold's test images.

Examples:
    python python/make_label_lists.py configs/data/msrc_v2.yaml configs/umtfss/lists/msrc_v2/fold0 --fold 0
    python python/make_label_lists.py configs/umtfss/pascal_resnet50_finetune100.yaml configs/umtfss/lists/pascal \
        data.train_list=/path/to/UMTFSS/lists/pascal/train.txt      # the paper's 5,953 images: 297 / 595 / 1,190
"""
import argparse
import math
import sys
from pathlib import Path

import numpy as np

from fsskern.data import DataError, build_source
from fsskern.data.index import scan_labels
from fsskern.engine.config import ConfigError, load_config


def training_ids(source, fold=None):
    """The ids of the source's training images; with ``fold``, those without a pixel of its novel classes."""
    if fold is None:
        return [source.sample_id(i) for i in range(len(source))]
    stats = scan_labels(source)
    _, novel = source.fold_classes(fold)
    return [source.sample_id(i) for i in range(len(source))
            if i not in stats.skipped and not set(novel).intersection(stats.pixels[i])]


def label_lists(ids, ratios, seed):
    """{ratio: ids}: the first floor(ratio % x n) (>= 1) of one seeded permutation, each in the given order."""
    order = np.random.default_rng(seed).permutation(len(ids))
    out = {}
    for r in ratios:
        chosen = set(order[:max(1, math.floor(len(ids) * r / 100))].tolist())
        out[r] = [sid for i, sid in enumerate(ids) if i in chosen]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a config whose data section names the source (its train split is read)")
    parser.add_argument("out", type=Path, help="folder for train_<ratio>.txt")
    parser.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    parser.add_argument("--ratios", type=float, nargs="+", default=[5, 10, 20, 100])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fold", type=int, default=None)
    args = parser.parse_args(argv)
    if any(not 0 < r <= 100 for r in args.ratios):
        parser.error(f"ratios must be in (0, 100], got {args.ratios}")
    try:
        cfg = load_config(args.config, args.overrides)
        ids = training_ids(build_source(cfg.data, "train"), args.fold)
    except (ConfigError, DataError) as e:  # the user's config or data: its name, not a traceback
        print(f"make_label_lists: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for r, chosen in label_lists(ids, args.ratios, args.seed).items():
        path = args.out / f"train_{r:g}.txt"
        path.write_text("".join(sid + "\n" for sid in chosen))
        print(f"{path}: {len(chosen)} of {len(ids)} training images ({r:g} %, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
