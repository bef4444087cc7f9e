"""DPCL at the paper's size: one training step and one inference, ``ops=fused`` against ``ops=reference``.

    python benchmarks/models/dpcl.py               # ResNet-50 (OS 8, heads to 1536-d), 473 x 473, batch 2
    python benchmarks/models/dpcl.py --quick       # MobileNetV2 (output stride 32) at 129 x 129: a smoke run
    python benchmarks/models/dpcl.py --device cuda

Cases: {1-shot, 5-shot} x {train step, inference}, fp32, the paper's dictionary (8,192 keys) and negatives.
Per case: the median time of each side (runs interleaved, benchmarks/harness.py), the peak extra memory of
one call (CPU: resident memory in a fresh process per side; GPU: the caching allocator's peak), their ratios
from this one run, and the share of the call each backend op takes, forward and backward (an instrumented call
per side: the op's forward timed where the model calls it, its backward between the gradient reaching its
output and leaving its input). A training step is zero_grad + forward (with the momentum branch) + backward +
SGD step; inference is an eval-mode forward without autograd. Weights are random (timings do not depend on
them); support masks hold a 30 % foreground box. A reference side that would not fit in the memory available
(it upsamples 1536-channel features to 473 x 473 for every support image and mask) is not run, and the
report says so with the estimate. Writes benchmarks/results/models/dpcl{,-quick}{,-cuda}.{json,md}.
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

from harness import cuda_peak_extra_bytes, device_sync, machine_info, median_times, peak_extra_bytes  # noqa: E402

from fsskern.backend import get_backend  # noqa: E402
from fsskern.engine.config import ModelConfig  # noqa: E402
from fsskern.models.dpcl import DPCL  # noqa: E402

TIMED_OPS = ("masked_average_pool", "class_prototypes")
TARGETS = {"speedup": 1.3, "memory_ratio": 0.4}  # training step, 1- and 5-shot (issue 14)
CASES = [dict(shots=k, mode=m) for k in (1, 5) for m in ("train", "infer")]


class _Stamp(torch.autograd.Function):
    """Identity whose backward calls ``clock()``: marks when a gradient passes a point of the graph."""

    @staticmethod
    def forward(ctx, x, clock):
        ctx.clock = clock
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.clock()
        return grad, None


class TimedBackend(SimpleNamespace):
    """The backend with its ops timed: forward seconds where the model calls them, backward seconds from the
    gradient reaching the op's output to its gradient leaving the features input (synchronised on a GPU)."""

    def __init__(self, backend, sync):
        super().__init__(name=backend.name, forward={op: 0.0 for op in TIMED_OPS},
                         backward={op: 0.0 for op in TIMED_OPS})
        for op in TIMED_OPS:
            setattr(self, op, self._timed(op, getattr(backend, op), sync))

    def _timed(self, op, fn, sync):
        def call(features, *args, **kwargs):
            track = features.requires_grad and torch.is_grad_enabled()
            started = []

            def begin():
                sync()
                started.append(time.perf_counter())

            def end():
                sync()
                self.backward[op] += time.perf_counter() - started.pop()
            if track:
                features = _Stamp.apply(features, end)
            sync()
            start = time.perf_counter()
            out = fn(features, *args, **kwargs)
            sync()
            self.forward[op] += time.perf_counter() - start
            if track:
                out = (_Stamp.apply(out[0], begin),) + tuple(out[1:]) if isinstance(out, tuple) else \
                    _Stamp.apply(out, begin)
            return out
        return call


def build(side, quick, device):
    torch.manual_seed(0)
    # quick: MobileNetV2 without dilation (torch's CPU backward of dilated depthwise convs is ~30x slower)
    cfg = ModelConfig(name="dpcl", backbone="mobilenet_v2" if quick else "resnet50", freeze_backbone=False,
                      params={"output_stride": 32} if quick else {})
    model = DPCL(cfg, get_backend(side)).to(device)
    model.backend = TimedBackend(model.backend, device_sync(device))
    return model


def episode(shots, quick, device, batch=2):
    size = 129 if quick else 473
    g = torch.Generator().manual_seed(0)
    lo, hi = int(size * 0.2), int(size * 0.2) + int(size * 0.3 ** 0.5)  # a box covering 30 % of the image
    masks = torch.zeros(batch, shots, size, size, dtype=torch.long)
    masks[..., lo:hi, lo:hi] = 1
    qmask = torch.zeros(batch, size, size, dtype=torch.long)
    qmask[:, lo:hi, lo + 10:hi + 10] = 1
    b = dict(query_img=torch.randn(batch, 3, size, size, generator=g),
             support_imgs=torch.randn(batch, shots, 3, size, size, generator=g), support_masks=masks,
             query_mask=qmask, classes=torch.arange(1, batch + 1).view(batch, 1), index=torch.arange(batch))
    return {k: v.to(device) for k, v in b.items()}


def step_fn(model, batch, mode):
    if mode == "infer":
        model.eval()

        def infer():
            with torch.no_grad():
                return model(batch)["logits"]
        return infer
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9,
                          weight_decay=5e-4)

    def train():
        opt.zero_grad(set_to_none=True)
        losses = model(batch)["losses"]
        sum(losses.values()).backward()
        opt.step()
    return train


def op_shares(fn, model, sync):
    """One instrumented call: the fraction of its wall time in each op's forward and backward."""
    timed = model.backend
    for op in TIMED_OPS:
        timed.forward[op] = timed.backward[op] = 0.0
    sync()
    start = time.perf_counter()
    fn()
    sync()
    total = time.perf_counter() - start
    return {op: {"forward": timed.forward[op] / total, "backward": timed.backward[op] / total} for op in TIMED_OPS}


def reference_bytes_estimate(shots, quick, batch=2):
    """What the reference's PANet pooling holds at once: the features upsampled to the mask size and their
    product with one mask, for every support image (B * K images x 1536 channels x H x W, fp32)."""
    size, channels = (129, 1536) if quick else (473, 1536)
    return 2 * batch * shots * channels * size * size * 4


def available_bytes():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def memory_child(index, side, quick):
    """Child process (CPU): warm the libraries up at a small size, then the peak extra RSS of one call."""
    case, device = CASES[index], torch.device("cpu")
    model = build(side, quick, device)
    step_fn(model, episode(case["shots"], True, device, batch=1), case["mode"])()
    fn = step_fn(model, episode(case["shots"], quick, device), case["mode"])
    print(json.dumps({"peak_extra_bytes": peak_extra_bytes(fn)}))


def peak_memory(index, sides, fns, quick, device):
    if device.type == "cuda":
        return [cuda_peak_extra_bytes(fn) for fn in fns]
    out = []
    for side in sides:
        cmd = [sys.executable, __file__, "--memory", str(index), side] + (["--quick"] if quick else [])
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_bytes"])
    return out


def run(args):
    device = torch.device(args.device)
    sync = device_sync(device)
    rows = []
    for index, case in enumerate(CASES):
        if args.only is not None and index not in args.only:
            continue
        need = reference_bytes_estimate(case["shots"], args.quick)
        free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else available_bytes()
        sides = ("reference", "fused") if need < 0.8 * free else ("fused",)
        models = [build(side, args.quick, device) for side in sides]
        batch = episode(case["shots"], args.quick, device)
        fns = [step_fn(m, batch, case["mode"]) for m in models]
        times = median_times(fns, args.reps, sync=sync)
        shares = [op_shares(fn, m, sync) for fn, m in zip(fns, models)]
        peaks = peak_memory(index, sides, fns, args.quick, device)
        row = dict(case, reps=args.reps, reference_estimate_gb=need / 1e9, available_gb=free / 1e9,
                   fused_s=times[-1], fused_peak_extra_mb=peaks[-1] / 2**20, fused_op_share=shares[-1])
        if len(sides) == 2:
            row.update(reference_s=times[0], speedup=times[0] / times[1], reference_peak_extra_mb=peaks[0] / 2**20,
                       memory_ratio=peaks[1] / peaks[0] if peaks[0] else None, reference_op_share=shares[0])
        rows.append(row)
        print(json.dumps(row), flush=True)
        del models, fns
    return rows


def _share(share):
    return " + ".join(f"{share[op]['forward']:.1%}/{share[op]['backward']:.1%}" for op in TIMED_OPS)


def report(rows, info, args):
    size = "MobileNetV2, 129 x 129 (quick)" if args.quick else "ResNet-50 (OS 8, 1536-d heads), 473 x 473"
    lines = [f"# DPCL: training step and inference, ops=fused vs ops=reference ({size}, batch 2)", "",
             f"Machine: {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['torch_threads']} torch threads)"
             f"{', GPU ' + info['gpu'] if info.get('gpu') else ''}; torch {info['torch']}.",
             f"Command: `python benchmarks/models/dpcl.py {' '.join(sys.argv[1:])}`; median of {args.reps} "
             "interleaved samples after a warm-up; memory = peak extra "
             f"{'device memory (allocator)' if info.get('gpu') else 'resident memory, one fresh process per side'}.",
             f"Targets (training step, 1- and 5-shot): speedup >= {TARGETS['speedup']}x, memory ratio <= "
             f"{TARGETS['memory_ratio']}. Op shares: forward/backward of masked_average_pool + class_prototypes.",
             "", "| shots | call | reference s | fused s | speedup | reference MB | fused MB | memory ratio "
             "| op shares reference | op shares fused | target |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "reference_s" not in r:
            lines.append(f"| {r['shots']} | {r['mode']} | not run | {r['fused_s']:.3f} | - | not run | "
                         f"{r['fused_peak_extra_mb']:.0f} | - | - | {_share(r['fused_op_share'])} | "
                         f"reference needs ~{r['reference_estimate_gb']:.1f} GB, {r['available_gb']:.1f} GB free |")
            continue
        met = r["speedup"] >= TARGETS["speedup"] and (r["memory_ratio"] or 0) <= TARGETS["memory_ratio"]
        target = ("met" if met else "missed") if r["mode"] == "train" else "-"
        lines.append(f"| {r['shots']} | {r['mode']} | {r['reference_s']:.2f} | {r['fused_s']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['reference_peak_extra_mb']:.0f} | {r['fused_peak_extra_mb']:.0f} | "
                     f"{r['memory_ratio']:.2f} | {_share(r['reference_op_share'])} | {_share(r['fused_op_share'])} | "
                     f"{target} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", type=int, nargs="*", help="case indices to run (default: all)")
    parser.add_argument("--memory", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        return memory_child(int(args.memory[0]), args.memory[1], args.quick)
    info = machine_info(args.device)
    rows = run(args)
    stem = "dpcl" + ("-quick" if args.quick else "") + ("-cuda" if args.device.startswith("cuda") else "")
    out = HERE.parent / "results" / "models"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "command": sys.argv[1:], "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(report(rows, info, args))
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
