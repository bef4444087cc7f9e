"""Engine overhead: steps per second of a small model through ``fsskern.engine`` against a bare
PyTorch loop over the same episodes (target: <= 5% overhead), and evaluation episodes per second.

Each side runs twice, with N1 and N2 iterations, and its rate is computed from the differences (N2 - N1 steps),
so start-up costs (model build, class index, worker start) cancel out. The two sides alternate over --rounds
rounds (a machine's drift then falls on both), the overhead comes from their median rates, and a verdict is
"inconclusive" when either side's rates spread over more than the 5 % being tested.

    python benchmarks/engine.py [--data ../shared/data/msrc_v2] [--iters 20 60] [--rounds 3]
Writes benchmarks/results/engine.{json,md}.
"""
import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import engine_support  # noqa: E402,F401  (registers tiny_panet, a small trainable model)

from fsskern.engine.config import load_config  # noqa: E402
from fsskern.engine.data import episode_loader, train_dataset  # noqa: E402
from fsskern.engine.evaluator import evaluate_model  # noqa: E402
from fsskern.engine.trainer import positions, train  # noqa: E402
from fsskern.models import create_model  # noqa: E402


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def config(data, out, iters):
    return load_config(ROOT / "configs/data/msrc_v2.yaml", [
        f"data.root={data}", f"out={out}", "model.name=tiny_panet", f"train.iters={iters}",
        "train.checkpoint_every=1000000", "train.val_episodes=0", "data.batch_size=4", "data.num_workers=1",
        "data.train_size=161", "train.lr=0.01"])


def engine_seconds(data, iters):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(data, tmp, iters)
        tic = time.perf_counter()
        train(cfg)
        return time.perf_counter() - tic


def bare_seconds(data, iters):
    """The loop a user would write by hand: same data, model, optimizer and loss; nothing else."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config(data, tmp, iters)
        tic = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = create_model(cfg.model, cfg.ops)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr, momentum=0.9, weight_decay=1e-4)
        loader = episode_loader(train_dataset(cfg), positions(cfg, 0), cfg.data.batch_size, cfg.data.num_workers,
                                seed=cfg.seed)
        model.train()
        for batch in loader:
            loss = sum(model(batch)["losses"].values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return time.perf_counter() - tic


def eval_rate(data, episodes=200):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs/baseline/msrc_v2_mobilenet_v2.yaml",
                          [f"data.root={data}", f"out={tmp}", f"eval.episodes={episodes}", "eval.seeds=[0]",
                           "data.num_workers=1", "eval.min_class_episodes=0"])
        model = create_model(cfg.model, cfg.ops)
        tic = time.perf_counter()
        evaluate_model(cfg, model, progress=False)
        return episodes / (time.perf_counter() - tic)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/msrc_v2"))
    p.add_argument("--iters", type=int, nargs=2, default=[20, 60])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results"))
    args = p.parse_args()
    torch.set_num_threads(2)
    n1, n2 = args.iters
    sides = {"bare": bare_seconds, "engine": engine_seconds}
    rows = {name: {"seconds": [], "rates": []} for name in sides}
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            t1, t2 = sides[name](args.data, n1), sides[name](args.data, n2)
            rows[name]["seconds"].append([t1, t2])
            rows[name]["rates"].append((n2 - n1) / (t2 - t1))
    for row in rows.values():
        row["steps_per_s"] = statistics.median(row["rates"])
        row["spread"] = (max(row["rates"]) - min(row["rates"])) / row["steps_per_s"]
    overhead = rows["bare"]["steps_per_s"] / rows["engine"]["steps_per_s"] - 1
    target = 0.05
    noisy = max(row["spread"] for row in rows.values()) > target
    verdict = "inconclusive" if noisy else ("met" if overhead <= target else "MISSED")
    result = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "iters": [n1, n2], "rounds": args.rounds,
              **rows, "overhead": overhead, "target": target, "verdict": verdict, "met": verdict == "met",
              "eval_episodes_per_s": eval_rate(args.data)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(result, indent=1))
    md = [f"# Engine overhead ({result['cpu']}, {result['threads']} threads)", "",
          f"`python benchmarks/engine.py --iters {n1} {n2} --rounds {args.rounds}`: tiny_panet, MSRC-v2, 161 crop, "
          f"batch 4, 1 worker; the sides alternate round by round.", "",
          "| loop | steps/s (median) | per round | spread |", "|---|---|---|---|",
          *(f"| {label} | {rows[name]['steps_per_s']:.2f} | {', '.join(f'{v:.2f}' for v in rows[name]['rates'])} | "
            f"{100 * rows[name]['spread']:.0f} % |" for name, label in (("bare", "bare PyTorch"),
                                                                        ("engine", "fsskern.engine"))),
          "", f"Overhead {100 * overhead:+.1f}% (target <= 5%: {verdict}"
          f"{'; a side spread over more than the target' if noisy else ''}). "
          f"Evaluation (baseline, MobileNetV2, 1-shot): {result['eval_episodes_per_s']:.1f} episodes/s."]
    (out / "engine.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
