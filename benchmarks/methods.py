"""One table of the methods: every method's MSRC-v2 CPU recipe and the baselines, trained and evaluated the
same way (same folds, backbone, crop, training budget, episodes and seeds).

    python benchmarks/methods.py [--methods baseline panet dpcl bam rilfs ...] [--folds 0 1] [--shots 1 5]
                                 [--seeds 0 1 2] [--episodes 1000] [--iters N] [--jobs 2] [--quick]

For each method and fold: train its recipe (``configs/<method>/msrc_v2_mobilenet_v2.yaml``, or the fold's own
``..._fold<k>.yaml`` where a recipe has one; the baseline trains nothing) with ``train.iters`` set to the shared
budget, evaluate 1-shot and 5-shot on the fold's novel classes (the 1-shot-trained model; a model built for one
K only is marked "not run" at the other), and time one training step and one inference on a real batch with
``ops=fused`` and ``ops=reference``. Every finished (method, fold) is written to ``OUT/runs.json`` at once, so
an interrupted run resumes where it stopped.
``--jobs N`` runs N (method, fold) tasks at a time, each in its own process with cores / N threads (one
process per core is faster on a small CPU than one process with every thread: most of a step is small ops).
A task that fails is named in the report, which holds the finished ones, and the exit status is 1.
Writes OUT/results.json, OUT/report.md (1-shot also per fold, each fold judged against the baseline's) and
OUT/miou.png (mean +- std over seeds, averaged over folds).
"""
import argparse
import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # harness, also where a test loads this file
from fsskern.engine.cli import last_phase, run_checkpoint  # noqa: E402
from fsskern.engine.config import load_config  # noqa: E402
from fsskern.engine.evaluator import evaluate  # noqa: E402
from fsskern.engine.trainer import refuse_other_fold, train  # noqa: E402
from fsskern.pseudo_tasks import ensure_for_run  # noqa: E402
from harness import median_times  # noqa: E402

DEFAULT_METHODS = ["baseline", "panet", "dpcl", "bam", "rilfs", "crcnet", "popnet", "umtfss"]


def recipe(method: str, fold: int = 0) -> Path:
    """The method's MSRC-v2 CPU recipe; a fold whose image lists differ (UMTFSS's) has its own file."""
    own = ROOT / "configs" / method / f"msrc_v2_mobilenet_v2_fold{fold}.yaml"
    return own if own.is_file() else ROOT / "configs" / method / "msrc_v2_mobilenet_v2.yaml"


def settings(args) -> dict:
    """What a row's figures depend on besides the code and the data: a row made with other settings is not this
    run's to reuse."""
    return {"shots": args.shots, "seeds": args.seeds, "episodes": args.episodes, "iters": args.iters,
            "data": Path(args.data).resolve().name}


def save_row(done_path: Path, key: str, row: dict) -> dict:
    """Adds one finished task to runs.json under a lock (tasks of a --jobs run finish in any order)."""
    with open(done_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = json.loads(done_path.read_text()) if done_path.is_file() else {}
        done[key] = row
        tmp = done_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        tmp.replace(done_path)
    return done


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                platform.processor())


def step_times(cfg_path: Path, overrides, reps: int = 3) -> dict:
    """Median seconds of one training step and one inference on a real batch, fused vs reference, the four
    interleaved in turns of alternating order (harness.median_times): on the shared VMs the speed drifts within
    seconds, and timing one side after the other would charge the drift to one of them."""
    from fsskern.engine.data import episode_loader, train_dataset
    from fsskern.models import create_model
    batch, calls = None, {}
    for ops in ("fused", "reference"):
        cfg = load_config(cfg_path, [*overrides, f"ops={ops}", "data.num_workers=0"])
        if batch is None:
            batch = next(iter(episode_loader(train_dataset(cfg), range(cfg.data.batch_size), cfg.data.batch_size,
                                             0, seed=0)))
        torch.manual_seed(0)
        model = create_model(cfg.model, cfg.ops)

        def train_step(model=model):
            model.train()
            sum(model(batch)["losses"].values()).backward()
            model.zero_grad(set_to_none=True)

        def inference(model=model):
            model.eval()
            with torch.no_grad():
                model(batch)
        if any(p.requires_grad for p in model.parameters()):
            calls[ops, "train_step_s"] = train_step
        calls[ops, "inference_s"] = inference
    times = median_times(list(calls.values()), reps)
    out = {"fused": {}, "reference": {}}
    for (ops, key), t in zip(calls, times):
        out[ops][key] = t
    return out


def run_one(method: str, fold: int, args, out: Path) -> dict:
    cfg_path = recipe(method, fold)
    # Every method is tested at the same input size (the MSRC-v2 preset's 241; RILFS's recipe trains at 161).
    common = [f"data.fold={fold}", f"data.root={args.data}", "data.test_size=241", f"eval.episodes={args.episodes}",
              f"eval.seeds={json.dumps(args.seeds)}", "eval.min_class_episodes=0"]
    row = {"method": method, "fold": fold, "settings": settings(args)}
    run_dir = out / "runs" / f"{method}-fold{fold}"
    trains = load_config(cfg_path).train.iters > 0
    overrides = ([*common, f"out={run_dir}"] + ([f"train.iters={args.iters}"] if args.iters and trains else []) +
                 (["resume=true"] if (run_dir / "config.yaml").is_file() else []))
    train_cfg = load_config(cfg_path, overrides)
    refuse_other_fold(train_cfg)  # before stage A, which train() would reach first
    checkpoint, eval_cfg_path = None, cfg_path
    if train_cfg.train.iters > 0:
        tic = time.time()
        ensure_for_run(train_cfg)  # UMTFSS's stage A (its pseudo tasks), as python/train.py does
        train(train_cfg, overrides)
        row["train_s"] = time.time() - tic
        phase = last_phase(run_dir)
        checkpoint, eval_cfg_path = run_checkpoint(phase, "best"), phase / "config.yaml"
        row["train_iters"] = train_cfg.train.iters
    for shots in args.shots:
        cfg = load_config(eval_cfg_path, [*common, f"data.shots={shots}", f"out={run_dir / f'eval-{shots}shot'}",
                                          "resume=false"])
        try:
            m = evaluate(cfg, checkpoint)
        except ValueError as e:  # a model built for one K refuses another
            row[f"{shots}shot"] = {"not_run": str(e)}
            continue
        row[f"{shots}shot"] = {k: m[k] for k in ("miou", "miou_std", "fb_iou", "fb_iou_std")}
    no_cache = ["model.params.cache_mb=0"] if method == "baseline" else []  # time the backbone too
    row["steps"] = step_times(eval_cfg_path, [*common, f"out={run_dir / 'steps'}", *no_cache])
    return row


def report(rows, info) -> str:
    by_method = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    lines = [f"# Methods on MSRC-v2 (CPU recipes, MobileNetV2 ImageNet, 241 x 241)", "",
             f"Machine: {info['cpu']}, {info.get('jobs', 1)} task(s) at a time with {info['threads']} thread(s) each, "
             f"torch {info['torch']}. Command: "
             f"`python benchmarks/methods.py {' '.join(info['argv'])}`. mIoU / FB-IoU: mean ± std over seeds "
             f"(population std), averaged over folds {info['folds']} (1-shot also per fold); episodes "
             f"{info['episodes']} x seeds {info['seeds']} per fold; training budget "
             + (f"{info['iters']} iterations in each method's last phase (earlier phases keep their recipes' own: "
                "RILFS / BAM's base learner, UMTFSS's stages A and B)." if info["iters"] else "each recipe's."),
             "",
             "| method | 1-shot mIoU | 1-shot mIoU per fold | 1-shot FB-IoU | 5-shot mIoU | 5-shot FB-IoU | train min "
             "| step fused / ref (s) | inference fused / ref (s) |", "|---|---|---|---|---|---|---|---|---|"]

    def cell(rs, shots, key):
        vals = [r[f"{shots}shot"] for r in rs if f"{shots}shot" in r and key in r[f"{shots}shot"]]
        if not vals:
            return "not run"
        return f"{statistics.mean(v[key] for v in vals):.1f} ± {statistics.mean(v[key + '_std'] for v in vals):.1f}"

    def one_shot(r):
        return r.get("1shot", {}).get("miou")

    def per_fold(rs):  # the contract's verdict is per fold: a fold mean can hide a fold below the baseline
        by_fold = {r["fold"]: one_shot(r) for r in rs}
        vals = [f"{by_fold[f]:.1f}" if by_fold.get(f) is not None else "-" for f in info["folds"]]
        return " / ".join(vals) if any(v != "-" for v in vals) else "not run"

    def times(rs, key):
        f = [r["steps"]["fused"].get(key) for r in rs if r["steps"]["fused"].get(key)]
        g = [r["steps"]["reference"].get(key) for r in rs if r["steps"]["reference"].get(key)]
        return f"{statistics.mean(f):.3f} / {statistics.mean(g):.3f}" if f and g else "-"
    for method, rs in by_method.items():
        train_min = [r["train_s"] / 60 for r in rs if "train_s" in r]
        lines.append(f"| {method} | {cell(rs, 1, 'miou')} | {per_fold(rs)} | {cell(rs, 1, 'fb_iou')} | "
                     f"{cell(rs, 5, 'miou')} | {cell(rs, 5, 'fb_iou')} | "
                     f"{f'{statistics.mean(train_min):.1f}' if train_min else '-'} | ")
        lines[-1] += f"{times(rs, 'train_step_s')} | {times(rs, 'inference_s')} |"
    base = {r["fold"]: one_shot(r) for r in by_method.get("baseline", []) if one_shot(r) is not None}
    if base:  # none with --shots 5 alone
        losers = []
        for m, rs in by_method.items():
            folds = sorted(r["fold"] for r in rs if m != "baseline" and r["fold"] in base and
                           one_shot(r) is not None and one_shot(r) < base[r["fold"]])
            losers += [f"{m} (fold {', '.join(map(str, folds))})"] if folds else []
        lines += ["", "Below the training-free baseline (1-shot) on a fold: " + (", ".join(losers) or "none") + "."]
    if info.get("failed"):
        lines += ["", f"**Failed, not in this table** (their logs are above the report): {', '.join(info['failed'])}."]
    absent = [m for m in DEFAULT_METHODS if m not in by_method and not recipe(m).is_file()]
    if absent:
        lines += ["", f"No MSRC-v2 recipe, so not in this table: {', '.join(absent)}" +
                  (" (POPNet is one-shot human parsing: its episodes are people with body-part masks, "
                   "CCP / VITON / ATR-OS; see docs/methods/popnet.md)." if "popnet" in absent else ".")]
    return "\n".join(lines) + "\n"


def plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(dict.fromkeys(r["method"] for r in rows))
    means, stds = [], []
    for m in methods:
        vals = [r["1shot"] for r in rows if r["method"] == m and "miou" in r.get("1shot", {})]
        means.append(statistics.mean(v["miou"] for v in vals) if vals else 0.0)
        stds.append(statistics.mean(v["miou_std"] for v in vals) if vals else 0.0)
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 3.5))
    ax.bar(methods, means, yerr=stds, capsize=4, color="tab:blue")
    ax.set_ylabel("1-shot mIoU (%)")
    ax.set_title("MSRC-v2 novel classes, mean over folds (error bars: std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="*", default=None, help=f"default: those with a recipe of {DEFAULT_METHODS}")
    p.add_argument("--folds", type=int, nargs="*", default=[0, 1])
    p.add_argument("--shots", type=int, nargs="*", default=[1, 5])
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--iters", type=int, default=None,
                   help="one training budget for every method's last (or only) phase; a phase that sets its own "
                        "keeps it (RILFS / BAM's base learner, UMTFSS's stages A and B) (default: recipes')")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msrc_v2"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "methods"))
    p.add_argument("--jobs", type=int, default=1, help="(method, fold) tasks run at once, one process each")
    p.add_argument("--task", help=argparse.SUPPRESS)  # METHOD/foldK: a --jobs worker runs this one task
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: 2 iterations (the last phase), 4 episodes, 1 seed, fold 0, 1-shot")
    args = p.parse_args(argv)
    if args.quick:
        args.iters, args.episodes, args.seeds, args.folds, args.shots = 2, 4, [0], [0], [1]
    methods = args.methods or [m for m in DEFAULT_METHODS if recipe(m).is_file()]
    missing = [m for m in methods if not recipe(m).is_file()]
    if missing:
        p.error(f"no MSRC-v2 CPU recipe for {missing} (expected configs/<method>/msrc_v2_mobilenet_v2.yaml)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done_path = out / "runs.json"
    if args.task:
        m, fold = args.task.split("/fold")
        save_row(done_path, args.task, run_one(m, int(fold), args, out))
        return 0
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    other = sorted(key for key, row in done.items() if row.get("settings") != settings(args))
    if other:  # resumed, they would stand in this run's table under its settings
        print(f"methods: {done_path} holds rows made with other settings than {settings(args)} ({', '.join(other)}); "
              "pass another --out or delete them", file=sys.stderr)
        return 2
    todo = [f"{m}/fold{f}" for m in methods for f in args.folds if f"{m}/fold{f}" not in done]
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else torch.get_num_threads()
    if args.jobs > 1:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        argv_rest = argv if argv is not None else sys.argv[1:]

        def work(key):
            print(f"== {key}", flush=True)
            return subprocess.run([sys.executable, __file__, *argv_rest, "--task", key], env=env).returncode
        with ThreadPoolExecutor(args.jobs) as pool:
            failed = [key for key, code in zip(todo, pool.map(work, todo)) if code]
        done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    else:
        failed = []
        for key in todo:
            print(f"== {key}", flush=True)
            m, fold = key.split("/fold")
            done = save_row(done_path, key, run_one(m, int(fold), args, out))
    rows = [done[f"{m}/fold{f}"] for m in methods for f in args.folds if f"{m}/fold{f}" in done]
    info = {"cpu": cpu_name(), "threads": threads, "jobs": args.jobs, "torch": torch.__version__, "argv": argv or
            sys.argv[1:], "folds": args.folds, "episodes": args.episodes, "seeds": args.seeds, "iters": args.iters,
            "failed": failed}
    (out / "results.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    (out / "report.md").write_text(report(rows, info))
    plot(rows, out / "miou.png")
    print((out / "report.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
