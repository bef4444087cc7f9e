"""Data pipeline throughput on the real VOC 2012 sample (../shared/data/voc2012_sample, 500x375 JPEGs):
training episodes (decode + PFENet augmentation at 473, 1-shot and 5-shot) and test episodes (pfenet
rule at 473), in the main process (CPU time of one core: the target is <= 15 ms for a 473 1-shot
training episode) and through a DataLoader with 1 and 2 workers (episodes/s, wall clock).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_pipeline.py [--episodes 60]

Writes benchmarks/results/data_pipeline.md and .json."""
import argparse
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from fsskern.data import build_source  # noqa: E402
from fsskern.data.episodes import TrainEpisodes  # noqa: E402
from fsskern.data.index import scan_labels, training_pools  # noqa: E402
from fsskern.data.loader import EpisodeDataset, collate_episodes  # noqa: E402
from fsskern.data.transforms import TestTransform, TrainTransform  # noqa: E402
from fsskern.engine.config import DataConfig  # noqa: E402

VOC = REPO.parent / "shared" / "data" / "voc2012_sample"
TARGET_MS = 15.0


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def in_process(ds, n: int) -> dict:
    """CPU ms and wall ms per episode in this process (one thread)."""
    ds[0]  # warm-up: first decode, allocator, lazy imports
    c0, w0 = time.process_time(), time.perf_counter()
    for i in range(1, n + 1):
        ds[i % len(ds)]
    return {"cpu_ms": 1000 * (time.process_time() - c0) / n, "wall_ms": 1000 * (time.perf_counter() - w0) / n}


def cpu_ms(fn, n: int) -> float:
    fn()
    c0 = time.process_time()
    for _ in range(n):
        fn()
    return 1000 * (time.process_time() - c0) / n


def through_loader(ds, n: int, workers: int) -> float:
    """Episodes/s through a DataLoader (batch 1), after the workers have started."""
    sub = torch.utils.data.Subset(ds, [i % len(ds) for i in range(n + 2 * workers)])
    it = iter(DataLoader(sub, batch_size=1, num_workers=workers, collate_fn=collate_episodes))
    for _ in range(2 * workers):
        next(it)
    t0 = time.perf_counter()
    count = sum(1 for _ in it)
    return count / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--episodes", type=int, default=60)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "data_pipeline"))
    a = p.parse_args()
    if not VOC.is_dir():
        raise SystemExit(f"needs the VOC sample at {VOC}")
    torch.set_num_threads(1)
    cfg = DataConfig(dataset="pascal", root=str(VOC))
    src = build_source(cfg, "train")
    stats = scan_labels(src)
    rows = []
    for shots in (1, 5):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # classes with < shots + 1 sample images are left out
            pools = training_pools(src, stats, 0, "pfenet", 2048)
            episodes = TrainEpisodes(pools.train, {"bench": 0}, shots=shots)
        base, novel = src.fold_classes(0)
        ds = EpisodeDataset(src, episodes, TrainTransform(473), True, base=base, novel=novel)
        rows.append({"pipeline": f"train 473 {shots}-shot", **in_process(ds, a.episodes),
                     **{f"eps_{w}w": through_loader(ds, a.episodes, w) for w in (1, 2)}})
    # test: the sample holds no complete PASCAL-5i fold (every fold misses a class with >= 2048 px), so
    # the test pipeline runs on 1-shot episodes of the training classes; the work per episode is the same
    episodes = TrainEpisodes(pools.train, {"bench": 1}, shots=1)
    specs = [episodes.episode(0, i) for i in range(len(episodes))]
    ds = EpisodeDataset(src, specs, TestTransform(473, "pfenet"), False)
    rows.append({"pipeline": "test 473 1-shot (pfenet rule)", **in_process(ds, a.episodes),
                 **{f"eps_{w}w": through_loader(ds, a.episodes, w) for w in (1, 2)}})
    # where a training episode's time goes (CPU ms, one core)
    image, label = src.load(0)
    gen = torch.Generator().manual_seed(0)
    aug = TrainTransform(473)
    breakdown = {"decode image + label": cpu_ms(lambda: src.load(0), a.episodes),
                 "TrainTransform(473), 1 image + 2 labels": cpu_ms(lambda: aug(image, [label, label], gen), a.episodes)}
    train1 = rows[0]["cpu_ms"]
    result = {"breakdown_cpu_ms": breakdown, "cpu": cpu_name(), "threads": torch.get_num_threads(),
              "episodes": a.episodes, "rows": rows,
              "target_ms": TARGET_MS, "target_met": train1 <= TARGET_MS,
              "torch": torch.__version__, "python": platform.python_version()}
    lines = ["# Data pipeline throughput (VOC 2012 sample, real 500x375 JPEGs)", "",
             f"CPU: {result['cpu']}; torch {torch.__version__}; one intra-op thread; {a.episodes} episodes per row.",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/data_pipeline.py --episodes {a.episodes}`", "",
             "| pipeline | CPU ms / episode (1 core) | wall ms / episode | episodes/s, 1 worker "
             "| episodes/s, 2 workers |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pipeline']} | {r['cpu_ms']:.1f} | {r['wall_ms']:.1f} | {r['eps_1w']:.1f} "
                     f"| {r['eps_2w']:.1f} |")
    lines += ["", "Per-part CPU ms (one core): " + "; ".join(f"{k}: {v:.1f}" for k, v in breakdown.items())
              + " (a 1-shot episode = 2 decodes + 2 transforms + label mapping)."]
    lines += ["", f"Target: a 473 1-shot training episode in <= {TARGET_MS:.0f} ms of one core: "
              f"{'met' if result['target_met'] else 'missed'} ({train1:.1f} ms)."]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
