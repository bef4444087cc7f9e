"""The first job of a model user (``make demo``): on real photos, the training-free baseline against one
trained method, both evaluated 1-shot on the novel classes of MSRC-v2 fold 0 with the same episodes.

    python python/demo.py [--data ../shared/data/msrc_v2] [--out runs/demo] [--method CONFIG] [--iters N]
                          [--episodes 300] [--seeds "[0]"]

Writes OUT/report.md (the mIoU table and the overlays of good, median and bad episodes of each model)
and OUT/<model>/ (metrics.json, overlays/*.png, TensorBoard images under tb/). Re-running reuses a
finished training (the run resumes where it stopped) trained with the same settings; one with others (another
--iters, --method or --data) is refused rather than reported as this run's.
"""
import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = """MSRC-v2 is not at {data}.
The demo reads the MSRC-v2 photos and labels as a labelled folder:
  {data}/images/<id>.png        the 591 photos
  {data}/labels/<id>.png        8-bit label maps: 0 void, 1..23 the classes
  {data}/class_counts.tsv       'label_value<TAB>class<TAB>images' rows (the class list)
Get MSRC-v2 (Microsoft Research Cambridge object recognition images v2) with the per-pixel labels of
Malisiewicz and Efros (BMVC 2007), convert the BMPs to PNG, and pass DATA=/path/to/msrc_v2."""


def run(cmd):
    from fsskern.engine.cli import evaluate_main, train_main
    print("$ python python/" + " ".join(cmd), flush=True)
    code = (train_main if cmd[0] == "train.py" else evaluate_main)(cmd[1:])
    if code:
        raise SystemExit(f"demo: {' '.join(cmd)} failed with exit code {code}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msrc_v2"))
    p.add_argument("--out", default=str(ROOT / "runs" / "demo"))
    # DPCL: of the five methods' MSRC-v2 CPU recipes the only one that trains within the demo's 10 minutes
    # (benchmarks/results/methods, session 47, fold 0, 1-shot, 200 episodes x 3 seeds: DPCL 66.9 after 1.7 min of
    # training; RILFS 70.0 after 17.7, CRCNet 70.7 after 17.2, UMTFSS 68.4 after 11.0; the baseline 64.9)
    p.add_argument("--method", default=str(ROOT / "configs" / "dpcl" / "msrc_v2_mobilenet_v2.yaml"))
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the recipe's)")
    p.add_argument("--episodes", type=int, default=300)
    p.add_argument("--seeds", default="[0]")
    args = p.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    if not all(f.exists() for f in (data / "images", data / "labels", data / "class_counts.tsv")):
        print(LAYOUT.format(data=data), file=sys.stderr)
        return 2
    if not Path(args.method).is_file():  # before the baseline's evaluation, not after it
        print(f"demo: no method config at {args.method}", file=sys.stderr)
        return 2
    # Both models on the same episodes at the same input size (the MSRC-v2 preset's 241).
    common = [f"data.root={data}", "data.fold=0", "data.shots=1", "data.test_size=241",
              f"eval.episodes={args.episodes}", f"eval.seeds={args.seeds}", "eval.visualize=true"]
    timings = {}
    tic = time.time()
    run(["evaluate.py", str(ROOT / "configs/baseline/msrc_v2_mobilenet_v2.yaml"), f"out={out / 'baseline'}",
         *common])
    timings["baseline evaluation"] = time.time() - tic

    method = Path(args.method).parent.name
    train_out = out / f"{method}-train"
    tic = time.time()
    train_args = [f"out={train_out}", f"data.root={data}", "data.fold=0", "data.shots=1"]
    if args.iters:
        train_args.append(f"train.iters={args.iters}")
    changed = _changed_settings(train_out, args.method, train_args)
    if changed:
        print(f"demo: {train_out} holds a training with other settings ({', '.join(changed)}); pass another --out "
              "or delete it", file=sys.stderr)
        return 2
    if not (train_out / "config.yaml").is_file() or not _finished(train_out):
        resume = ["resume=true"] if (train_out / "config.yaml").is_file() else []
        run(["train.py", args.method, *train_args, *resume])
    timings[f"{method} training"] = time.time() - tic
    tic = time.time()
    run(["evaluate.py", str(train_out), f"out={out / method}", *common])
    timings[f"{method} evaluation"] = time.time() - tic
    report = write_report(out, ["baseline", method], timings)
    print(f"\nreport: {report}")
    return 0


def _changed_settings(run_dir: Path, method: str, train_args) -> list:
    """The settings where the run already in run_dir differs from what this command would train, those a resume
    may change (resume itself, where it logs, ...) left out as the trainer leaves them out, but the data's root:
    a resume may find the same data elsewhere, and the demo would report a model trained on other photos."""
    if not (run_dir / "config.yaml").is_file():
        return []
    from fsskern.engine.config import load_config, read_yaml, to_dict
    from fsskern.engine.trainer import changed_settings
    then, now = read_yaml(run_dir / "config.yaml"), to_dict(load_config(method, train_args))
    roots = [str(Path(tree["data"]["root"]).resolve()) for tree in (then, now)]
    return changed_settings(then, now) + [f"data.root {roots[0]} -> {roots[1]}"] * (roots[0] != roots[1])


def _finished(run_dir: Path) -> bool:
    from fsskern.engine.cli import last_phase
    from fsskern.engine.trainer import finished_at
    return finished_at(last_phase(run_dir)) is not None


def write_report(out: Path, models, timings) -> Path:
    rows, figures = [], []
    for name in models:
        m = json.loads((out / name / "metrics.json").read_text())
        rows.append(f"| {name} | {m['miou']:.1f} ± {m['miou_std']:.1f} | {m['fb_iou']:.1f} ± {m['fb_iou_std']:.1f} | "
                    f"{m['episodes']} x {len(m['seeds'])} | {m['manifest_sha256'][0][:12]} |")
        for path in m.get("overlays", []):
            rel = Path(path).resolve().relative_to(out.resolve())
            figures.append(f"**{name}, {rel.stem.split('-')[0]}** ({rel.stem}):\n\n![{name} {rel.stem}]({rel})\n")
    lines = ["# fsskern demo: MSRC-v2, fold 0 novel classes (cow, sheep, aeroplane, face), 1-shot", "",
             "| model | mIoU (%) | FB-IoU (%) | episodes x seeds | manifest |", "|---|---|---|---|---|", *rows, "",
             "Same manifest (episodes) for both models. Wall time: " +
             ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + ".", "",
             "Overlays: support with its mask, query, ground truth, prediction (IoU of the episode).", "", *figures]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    sys.exit(main())
