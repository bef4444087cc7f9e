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


def score(mean, std) -> str:
    """'66.6 ± 0.2', or '-' for a metric the model has not (a parsing model's FB-IoU is null)."""
    return "-" if mean is None else f"{mean:.1f} ± {std:.1f}"


def main(paths) -> int:
    if not paths or paths[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 0 if paths else 2
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:  # a glob that matched nothing reaches here as itself
        print(f"summarize: no such file: {missing[0]}", file=sys.stderr)
        return 2
    rows = [row(Path(p)) for p in paths]
    print("| run | fold | shots | mIoU (%) | FB-IoU (%) | episodes x seeds | manifest |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['fold']} | {r['shots']} | {score(r['miou'], r['miou_std'])} | "
              f"{score(r['fb_iou'], r['fb_iou_std'])} | {r['episodes']} | {r['manifest']} |")
    if len(rows) > 1:
        def mean(k):
            values = [r[k] for r in rows if r[k] is not None]
            return f"**{sum(values) / len(values):.1f}**" if values else "-"
        print(f"| **mean** | | | {mean('miou')} | {mean('fb_iou')} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
