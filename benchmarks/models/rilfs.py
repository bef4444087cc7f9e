"""RILFS at the paper's size: one training step and one inference, ``ops=fused`` against ``ops=reference``.

    python benchmarks/models/rilfs.py              # ResNet-50 (deep stem, OS 8), 473 x 473, batch 2
    python benchmarks/models/rilfs.py --quick      # MobileNetV2 at 129 x 129: a smoke run
    python benchmarks/models/rilfs.py --device cuda

Cases: {1-shot, 5-shot} x {train step, inference} in fp32, and 1-shot under bf16 autocast (--bf16-5shot
adds 5-shot). Per case: the median time of each side (runs interleaved, benchmarks/harness.py), the peak
extra memory of one call (CPU: resident memory in a fresh process per side; GPU: the caching
allocator's peak), their ratios from this one run, and the share of the call that each backend op takes
(an instrumented call per side: ``prior_mask`` and ``masked_average_pool`` timed where the model calls
them). A training step is zero_grad + forward + backward + SGD step; inference is an eval-mode forward
without autograd. Weights are random (the timings do not depend on them); the support masks hold a 30 %
foreground box, so the fused prior skips 70 % of the support pixels as it would on real masks.
Writes benchmarks/results/models/rilfs{,-quick}.{json,md} (with --device cuda: rilfs-cuda.*).
"""
import argparse
import json
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from harness import cuda_peak_extra_bytes, device_sync, machine_info, median_times, peak_extra_bytes  # noqa: E402

from fsskern.backend import get_backend  # noqa: E402
from fsskern.engine.config import ModelConfig  # noqa: E402
from fsskern.models.rilfs import RILFS  # noqa: E402

TIMED_OPS = ("prior_mask", "masked_average_pool")
TARGETS = {"speedup": 1.15, "memory_ratio": 0.7}


def cases(bf16_5shot=False):
    out = [dict(shots=k, mode=m, amp="none") for k in (1, 5) for m in ("train", "infer")]
    out += [dict(shots=k, mode=m, amp="bf16") for k in ((1, 5) if bf16_5shot else (1,)) for m in ("train", "infer")]
    return out


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


def build(side, shots, quick, device):
    torch.manual_seed(0)
    cfg = ModelConfig(name="rilfs", backbone="mobilenet_v2" if quick else "resnet50_v2",
                      params={"shots": shots})
    model = RILFS(cfg, get_backend(side)).to(device)
    model.backend = TimedBackend(model.backend, device_sync(device))
    return model


def episode(shots, quick, device, batch=2):
    size = 129 if quick else 473
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(batch, shots, size, size, dtype=torch.long)
    lo, hi = int(size * 0.2), int(size * 0.2) + int(size * 0.3 ** 0.5)  # a box covering 30 % of the image
    masks[..., lo:hi, lo:hi] = 1
    qmask = torch.zeros(batch, size, size, dtype=torch.long)
    qmask[:, lo:hi, lo + 10:hi + 10] = 1
    b = dict(query_img=torch.randn(batch, 3, size, size, generator=g),
             support_imgs=torch.randn(batch, shots, 3, size, size, generator=g), support_masks=masks,
             query_mask=qmask, base_label=qmask * 3, classes=torch.ones(batch, 1, dtype=torch.long))
    return {k: v.to(device) for k, v in b.items()}


def step_fn(model, batch, mode, amp, device):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else nullcontext()
    if mode == "infer":
        model.eval()

        def infer():
            with torch.no_grad(), autocast:
                return model(batch)["logits"]
        return infer
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def train():
        opt.zero_grad(set_to_none=True)
        with autocast:
            losses = model(batch)["losses"]
        sum(losses.values()).backward()
        opt.step()
    return train


def op_shares(fn, model, sync):
    """One instrumented call: the fraction of its wall time spent in each timed op."""
    for op in TIMED_OPS:
        model.backend.seconds[op] = 0.0
    sync()
    start = time.perf_counter()
    fn()
    sync()
    total = time.perf_counter() - start
    return {op: model.backend.seconds[op] / total for op in TIMED_OPS}


def memory_child(index, side, quick, bf16_5shot):
    """Child process (CPU): warm the libraries up at a small size, then the peak extra RSS of one call."""
    case, device = cases(bf16_5shot)[index], torch.device("cpu")
    model = build(side, case["shots"], quick, device)
    step_fn(model, episode(case["shots"], True, device, batch=1), case["mode"], case["amp"], device)()
    fn = step_fn(model, episode(case["shots"], quick, device), case["mode"], case["amp"], device)
    print(json.dumps({"peak_extra_bytes": peak_extra_bytes(fn)}))


def peak_memory(index, fns, quick, bf16_5shot, device):
    if device.type == "cuda":
        return [cuda_peak_extra_bytes(fn) for fn in fns]
    out = []
    for side in ("reference", "fused"):
        cmd = [sys.executable, __file__, "--memory", str(index), side] + (["--quick"] if quick else []) + \
              (["--bf16-5shot"] if bf16_5shot else [])
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out.append(json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_bytes"])
    return out


def run(args):
    device = torch.device(args.device)
    sync = device_sync(device)
    rows = []
    for index, case in enumerate(cases(args.bf16_5shot)):
        if args.only is not None and index not in args.only:
            continue
        models = [build(side, case["shots"], args.quick, device) for side in ("reference", "fused")]
        batch = episode(case["shots"], args.quick, device)
        fns = [step_fn(m, batch, case["mode"], case["amp"], device) for m in models]
        for m in models:
            m.backend.seconds.update({op: 0.0 for op in TIMED_OPS})
        start = time.perf_counter()
        t_ref, t_fused = median_times(fns, args.reps, sync=sync)
        if args.reps == 1:  # the one warm-up and the one sample per side: shares from those two calls
            shares = [{op: m.backend.seconds[op] / (2 * t) for op in TIMED_OPS}
                      for m, t in zip(models, (t_ref, t_fused))]
        else:
            shares = [op_shares(fn, m, sync) for fn, m in zip(fns, models)]
        print(f"case {index}: timed in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        m_ref, m_fused = peak_memory(index, fns, args.quick, args.bf16_5shot, device)
        row = dict(case, reference_s=t_ref, fused_s=t_fused, speedup=t_ref / t_fused,
                   reference_peak_extra_mb=m_ref / 2**20, fused_peak_extra_mb=m_fused / 2**20,
                   memory_ratio=m_fused / m_ref if m_ref else None,
                   reference_op_share=shares[0], fused_op_share=shares[1], reps=args.reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del models, fns
    return rows


def report(rows, info, args):
    size = "MobileNetV2, 129 x 129 (quick)" if args.quick else "ResNet-50 (deep stem, OS 8), 473 x 473"
    lines = [f"# RILFS: training step and inference, ops=fused vs ops=reference ({size}, batch 2)", "",
             f"Machine: {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['torch_threads']} torch threads)"
             f"{', GPU ' + info['gpu'] if info.get('gpu') else ''}; torch {info['torch']}.",
             f"Command: `python benchmarks/models/rilfs.py {' '.join(sys.argv[1:])}`; median of {args.reps} "
             "interleaved samples after a warm-up; memory = peak extra "
             f"{'device memory (allocator)' if info.get('gpu') else 'resident memory, one fresh process per side'}.",
             f"Targets (1-shot, fp32): speedup >= {TARGETS['speedup']}x, memory ratio <= {TARGETS['memory_ratio']}.",
             "", "| shots | call | amp | reference s | fused s | speedup | reference MB | fused MB | memory ratio "
             "| prior share ref / fused | MAP share ref / fused | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = r["speedup"] >= TARGETS["speedup"] and (r["memory_ratio"] or 0) <= TARGETS["memory_ratio"]
        target = ("met" if met else "missed") if (r["shots"], r["amp"]) == (1, "none") else "-"
        share = lambda op: f"{r['reference_op_share'][op]:.1%} / {r['fused_op_share'][op]:.1%}"  # noqa: E731
        lines.append(f"| {r['shots']} | {r['mode']} | {r['amp']} | {r['reference_s']:.3f} | {r['fused_s']:.3f} | "
                     f"{r['speedup']:.2f}x | {r['reference_peak_extra_mb']:.0f} | {r['fused_peak_extra_mb']:.0f} | "
                     f"{r['memory_ratio']:.2f} | {share('prior_mask')} | {share('masked_average_pool')} | {target} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--bf16-5shot", action="store_true")
    parser.add_argument("--only", type=int, nargs="*", help="case indices to run (default: all)")
    parser.add_argument("--memory", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        return memory_child(int(args.memory[0]), args.memory[1], args.quick, args.bf16_5shot)
    info = machine_info(args.device)
    rows = run(args)
    stem = "rilfs" + ("-quick" if args.quick else "") + ("-cuda" if args.device.startswith("cuda") else "")
    out = HERE.parent / "results" / "models"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "command": sys.argv[1:], "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(report(rows, info, args))
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
