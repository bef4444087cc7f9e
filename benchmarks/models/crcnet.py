"""CRCNet at the paper's size: one training step and one 10-step inference, ``ops=fused`` against ``ops=reference``.

    python benchmarks/models/crcnet.py              # ResNet-50 (torchvision stem, OS 8), 321 and 473, batch 2
    python benchmarks/models/crcnet.py --quick      # MobileNetV2 at 97 x 97: a smoke run
    python benchmarks/models/crcnet.py --device cuda --shots 1 5
    python benchmarks/models/crcnet.py --sizes 321 --reps 1   # one size, one sample per side (slow CPUs)

Cases: {321, 473} x {train step, inference} x shots (1 by default). Per case: the median time of each side
(interleaved samples, benchmarks/harness.py), the peak extra memory of one call (CPU: resident memory in a
fresh process per side; GPU: the caching allocator's peak), their ratios from this one run, and the share of the
call taken by the local conditional module's attention (``local_conditional_attention``) and by
``masked_average_pool``, timed where the model calls them. The training step (zero_grad, forward, backward, SGD
step: benchmarks/models/rilfs.py's ``step_fn``) runs the refinement loop with T fixed at 4, the largest draw of
the training schedule, so both sides do the same work; inference is 10 refinement steps, single scale. Random
weights; the support masks hold a 30 % foreground box.
Writes benchmarks/results/models/crcnet{,-quick}{,-cuda}.{json,md}.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from harness import cuda_peak_extra_bytes, device_sync, machine_info, median_times, peak_extra_bytes  # noqa: E402
from rilfs import step_fn  # noqa: E402

from fsskern.backend import get_backend  # noqa: E402
from fsskern.engine.config import ModelConfig  # noqa: E402
from fsskern.models.crcnet import CRCNet  # noqa: E402

TIMED_OPS = ("local_conditional_attention", "masked_average_pool")
TARGETS = {473: {"speedup": 1.05, "memory_ratio": 0.8}}


class TimedBackend(SimpleNamespace):
    """The backend with its ops timed (seconds summed per op; synchronised on a GPU)."""

    def __init__(self, backend, sync):
        super().__init__(name=backend.name, seconds={op: 0.0 for op in TIMED_OPS})
        for op in TIMED_OPS:
            setattr(self, op, self._timed(op, getattr(backend, op), sync))

    def _timed(self, op, fn, sync):
        def call(*args, **kwargs):
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.seconds[op] += time.perf_counter() - start
            return out
        return call


def cases(args):
    sizes = [97] if args.quick else args.sizes
    return [dict(size=s, shots=k, mode=m) for s in sizes for k in args.shots for m in ("train", "infer")]


def build(side, quick, device):
    torch.manual_seed(0)
    model = CRCNet(ModelConfig(name="crcnet", backbone="mobilenet_v2" if quick else "resnet50"), get_backend(side))
    model._train_steps = lambda: 4  # the same refinement work on both sides (see the module docstring)
    model.backend = TimedBackend(model.backend, device_sync(device))
    return model.to(device)


def episode(size, shots, device):
    g = torch.Generator().manual_seed(0)
    lo, hi = int(size * 0.2), int(size * 0.2) + int(size * 0.3 ** 0.5)
    masks = torch.zeros(2, shots, size, size, dtype=torch.long)
    masks[..., lo:hi, lo:hi] = 1
    qmask = torch.zeros(2, size, size, dtype=torch.long)
    qmask[:, lo:hi, lo + 10:hi + 10] = 1
    batch = dict(query_img=torch.randn(2, 3, size, size, generator=g), support_masks=masks, query_mask=qmask,
                 support_imgs=torch.randn(2, shots, 3, size, size, generator=g), classes=torch.ones(2, 1).long())
    return {k: v.to(device) for k, v in batch.items()}


def shares_of(fn, model, sync):
    for op in TIMED_OPS:
        model.backend.seconds[op] = 0.0
    sync()
    start = time.perf_counter()
    fn()
    sync()
    total = time.perf_counter() - start
    return {op: model.backend.seconds[op] / total for op in TIMED_OPS}


def memory_child(index, side, args):
    """Child process (CPU): warm the libraries up at a small size, then the peak extra RSS of one call."""
    case, device = cases(args)[index], torch.device("cpu")
    model = build(side, args.quick, device)
    step_fn(model, episode(65, case["shots"], device), case["mode"], "none", device)()
    fn = step_fn(model, episode(case["size"], case["shots"], device), case["mode"], "none", device)
    print(json.dumps({"peak_extra_bytes": peak_extra_bytes(fn)}))


def peak_memory(index, fns, args, device):
    if device.type == "cuda":
        return [cuda_peak_extra_bytes(fn) for fn in fns]
    out = []
    for side in ("reference", "fused"):
        cmd = [sys.executable, __file__, "--memory", str(index), side, "--shots", *map(str, args.shots),
               "--sizes", *map(str, args.sizes)]
        cmd += ["--quick"] if args.quick else []
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_bytes"])
    return out


def run(args):
    device = torch.device(args.device)
    sync = device_sync(device)
    rows = []
    for index, case in enumerate(cases(args)):
        models = [build(side, args.quick, device) for side in ("reference", "fused")]
        batch = episode(case["size"], case["shots"], device)
        fns = [step_fn(m, batch, case["mode"], "none", device) for m in models]
        t_ref, t_fused = median_times(fns, args.reps, sync=sync)
        shares = [shares_of(fn, m, sync) for fn, m in zip(fns, models)]
        m_ref, m_fused = peak_memory(index, fns, args, device)
        row = dict(case, reference_s=t_ref, fused_s=t_fused, speedup=t_ref / t_fused,
                   reference_peak_extra_mb=m_ref / 2**20, fused_peak_extra_mb=m_fused / 2**20,
                   memory_ratio=m_fused / m_ref if m_ref else None,
                   reference_op_share=shares[0], fused_op_share=shares[1], reps=args.reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del models, fns
    return rows


def report(rows, info, args):
    net = "MobileNetV2 (quick)" if args.quick else "ResNet-50 (torchvision stem, OS 8)"
    lines = [f"# CRCNet: training step and 10-step inference, ops=fused vs ops=reference ({net}, batch 2)", "",
             f"Machine: {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['torch_threads']} torch threads)"
             f"{', GPU ' + info['gpu'] if info.get('gpu') else ''}; torch {info['torch']}.",
             f"Command: `python benchmarks/models/crcnet.py {' '.join(sys.argv[1:])}`; median of {args.reps} "
             "interleaved samples after a warm-up; memory = peak extra "
             f"{'device memory (allocator)' if info.get('gpu') else 'resident memory, one fresh process per side'}.",
             "Targets (473, 1-shot): speedup >= 1.05x, memory ratio <= 0.8.", "",
             "| size | shots | call | reference s | fused s | speedup | reference MB | fused MB | memory ratio "
             "| local share ref / fused | MAP share ref / fused | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        goal = TARGETS.get(r["size"]) if r["shots"] == 1 else None
        target = "-" if goal is None else ("met" if r["speedup"] >= goal["speedup"] and
                                           (r["memory_ratio"] or 0) <= goal["memory_ratio"] else "missed")
        share = lambda op: f"{r['reference_op_share'][op]:.1%} / {r['fused_op_share'][op]:.1%}"  # noqa: E731
        lines.append(f"| {r['size']} | {r['shots']} | {r['mode']} | {r['reference_s']:.3f} | {r['fused_s']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['reference_peak_extra_mb']:.0f} | {r['fused_peak_extra_mb']:.0f} | "
                     f"{r['memory_ratio']:.2f} | {share('local_conditional_attention')} | "
                     f"{share('masked_average_pool')} | {target} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="+", default=[1])
    parser.add_argument("--sizes", type=int, nargs="+", default=[321, 473], help="input sides (not with --quick)")
    parser.add_argument("--memory", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        return memory_child(int(args.memory[0]), args.memory[1], args)
    info = machine_info(args.device)
    rows = run(args)
    stem = "crcnet" + ("-quick" if args.quick else "") + ("-cuda" if args.device.startswith("cuda") else "")
    out = HERE.parent / "results" / "models"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "command": sys.argv[1:], "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(report(rows, info, args))
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
