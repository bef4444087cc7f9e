"""Print a Markdown table of evaluation results: python python/summarize.py runs/baseline/fold*/metrics.json

One row per metrics.json (its folder, fold, shots, mIoU and FB-IoU as mean +- std over seeds, the
episodes x seeds and the manifest hash prefix) and, when there are several, the mean over them.
"""
import json
import sys
from pathlib import Path


def row(path: Path) -> dict:
    m = json.loads(path.read_text())
    d = m["config"]["data"]
    return {"run": str(path.parent), "fold": d["fold"], "shots": d["shots"], "miou": m["miou"],
            "miou_std": m["miou_std"], "fb_iou": m["fb_iou"], "fb_iou_std": m["fb_iou_std"],
            "episodes": f"{m['episodes']} x {len(m['seeds'])}", "manifest": m["manifest_sha256"][0][:12]}


def main(paths) -> int:
    if not paths:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    rows = [row(Path(p)) for p in paths]
    print("| run | fold | shots | mIoU (%) | FB-IoU (%) | episodes x seeds | manifest |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['fold']} | {r['shots']} | {r['miou']:.1f} ± {r['miou_std']:.1f} | "
              f"{r['fb_iou']:.1f} ± {r['fb_iou_std']:.1f} | {r['episodes']} | {r['manifest']} |")
    if len(rows) > 1:
        mean = lambda k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
        print(f"| **mean** | | | **{mean('miou'):.1f}** | **{mean('fb_iou'):.1f}** | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
