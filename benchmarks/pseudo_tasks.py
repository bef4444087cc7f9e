"""UMTFSS stage A throughput (fsskern.pseudo_tasks) on the first N MSRC-v2 photos (320 x 213; the paper
runs on COCO, 640 x 480): images per second of each step, from one cold build into a temporary folder.

Profiles:
- ``paper``: ResNet-50 (torchvision stem, output stride 32), layer4, k-means at 473, Eq. 4 at 640,
  descriptors at the original resolution, N = 50 (notes §2.2). The weights are a random-init
  ResNet-50 file written for the run (no MoCo-v2 file here): the cost of every step is the same,
  the clusters are not the paper's.
- ``cpu``: the CPU recipe, MobileNetV2 ImageNet at output stride 16, 241 everywhere, N = 50.

Steps: the backbone passes ``embed_sample`` (k-means sample at ``size``), ``embed_assign`` (every image at
``assign_size``) and ``embed_descriptor`` (when its size differs; images with a region only), summed as
``embedding (all passes)`` over all images; ``kmeans`` (faiss, 30 iterations), ``assign`` (Eq. 4 scores, bilinear
up-sampling, argmax), ``superpixels`` (Felzenszwalb + vote), ``regions`` (PNG, filters, masked means),
``neighbours`` (faiss top-k per cluster). images/s = images the step handled / its seconds.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pseudo_tasks.py --profile paper --images 500
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/pseudo_tasks.py --quick

Writes benchmarks/results/pseudo_tasks-<profile>[-quick].json and .md.
"""
import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from fsskern import pseudo_tasks  # noqa: E402
from fsskern.engine.config import DataConfig  # noqa: E402
from harness import machine_info  # noqa: E402

MSRC = REPO.parent / "shared" / "data" / "msrc_v2"
PROFILES = {
    "paper": {"backbone": "resnet50", "output_stride": 32, "size": 473, "assign_size": 640, "descriptor_size": None},
    "cpu": {"backbone": "mobilenet_v2", "weights": "imagenet", "output_stride": 16, "size": 241, "assign_size": 241,
            "descriptor_size": 241},
}
STEPS = ("embed_sample", "kmeans", "embed_assign", "assign", "superpixels", "embed_descriptor", "regions",
         "neighbours")
EMBED = ("embed_sample", "embed_assign", "embed_descriptor")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--profile", choices=sorted(PROFILES), default="paper")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--clusters", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--quick", action="store_true", help="12 images, 8 clusters (a smoke run)")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.quick:
        a.images, a.clusters = 12, 8
    if not (MSRC / "images").is_dir():
        raise SystemExit(f"needs MSRC-v2 at {MSRC}")
    import faiss
    faiss.omp_set_num_threads(torch.get_num_threads())  # honour OMP_NUM_THREADS for both libraries
    ids = sorted(f.stem for f in (MSRC / "images").glob("*.png"))[:a.images]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "list.txt").write_text("\n".join(ids) + "\n")
        spec = {"images": {"dataset": "folder", "root": str(MSRC), "classes": "class_counts.tsv",
                           "params": {"void": [0], "split_lists": {"train": str(tmp / "list.txt")}}},
                **PROFILES[a.profile], "clusters": a.clusters, "batch_size": a.batch_size}
        if a.profile == "paper":
            from fsskern.backbones import create_backbone
            torch.save(create_backbone("resnet50", output_stride=32).state_dict(), tmp / "resnet50_random.pth")
            spec["weights"] = str(tmp / "resnet50_random.pth")
        cfg = DataConfig(dataset="pseudo", root=str(tmp / "tasks"), params={"build": spec})
        t0 = time.perf_counter()
        result = pseudo_tasks.build_pseudo_tasks(cfg, progress=True)
        total = time.perf_counter() - t0
    sec, cnt = dict(result["seconds"]), dict(result["counts"])
    sec["embedding (all passes)"], cnt["embedding (all passes)"] = sum(sec[s] for s in EMBED), len(ids)
    rows = [{"step": s, "seconds": sec[s], "images": cnt[s], "images_per_s": cnt[s] / sec[s] if sec[s] else None}
            for s in STEPS + ("embedding (all passes)",)]
    report = {"profile": a.profile, "images": len(ids), "clusters": a.clusters, "batch_size": a.batch_size,
              "build": {k: v for k, v in spec.items() if k not in ("images", "weights")},
              "weights": "random-init file (timing only)" if a.profile == "paper" else "imagenet",
              "regions": result["regions"], "kmeans_vectors": result["kmeans_vectors"], "total_seconds": total,
              "images_per_s_end_to_end": len(ids) / total,
              "steps": rows, "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "machine": machine_info()}
    out = Path(a.out or REPO / "benchmarks" / "results" / f"pseudo_tasks-{a.profile}{'-quick' if a.quick else ''}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    lines = [f"# UMTFSS stage A, profile {a.profile}: {len(ids)} MSRC-v2 images, N = {a.clusters}",
             "", f"CPU: {report['machine']['cpu']}, {report['threads']} thread(s); total {total:.1f} s "
             f"({report['images_per_s_end_to_end']:.2f} images/s end to end), {result['regions']} regions.", "",
             "| step | seconds | images | images/s |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['seconds']:.2f} | {r['images']} | "
              f"{r['images_per_s']:.2f} |" if r["images_per_s"] else f"| {r['step']} | 0 | {r['images']} | - |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
