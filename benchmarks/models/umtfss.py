"""UMTFSS at the paper's size: one training step and one inference, ``ops=fused`` against ``ops=reference``, and the
prototype step (``support_prototypes``) alone.

    python benchmarks/models/umtfss.py              # ResNet-50 (deep stem, OS 8), 473 x 473, batch 2
    python benchmarks/models/umtfss.py --quick      # MobileNetV2 at 129 x 129 (17 x 17 tokens): a smoke run
    python benchmarks/models/umtfss.py --only 4 5   # the prototype step alone (cheap at any size)
    python benchmarks/models/umtfss.py --device cuda

Cases: {1-shot, 5-shot} x {train step, inference} of the whole model (paper profile: K_fg / K_bg 50 / 100, d 256),
then the prototype step alone at 1 and 5 shots: ``support_prototypes`` forward + backward through the cluster
means on (2, K, 256, h, w) support tokens. Per case: the median time of each side (runs interleaved,
benchmarks/harness.py), the peak extra memory of one call (CPU: resident memory in a fresh process per side; GPU:
the caching allocator's peak), their ratios from this one run, and the share of the call each backend op takes (an
instrumented call per side, the ops timed where the model calls them). A training step is zero_grad + forward +
backward + both optimisers' steps (SGD for the convolutions, AdamW for the Transformer, as the engine builds them);
inference is an eval-mode forward without autograd (clustering seeded per episode). Weights are random; the
support masks hold a 30 % foreground box. The reference clusters in PyTorch loops per image, as the public code.
Writes benchmarks/results/models/umtfss{,-quick}.{json,md} (with --device cuda: umtfss-cuda.*).
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
from fsskern.engine.config import ModelConfig, TrainConfig  # noqa: E402
from fsskern.engine.optim import build_optimizers  # noqa: E402
from fsskern.models.umtfss import UMTFSS  # noqa: E402

TIMED_OPS = ("support_prototypes", "prototype_attention", "prior_mask", "masked_average_pool")
TARGETS = {(1, "train"): 1.1, (5, "train"): 1.2, (1, "proto"): 50.0, (5, "proto"): 50.0}
MEMORY_TARGET = 0.7
CASES = [dict(shots=k, mode=m) for m in ("train", "infer") for k in (1, 5)] + \
        [dict(shots=k, mode="proto") for k in (1, 5)]


class TimedBackend(SimpleNamespace):
    """The backend with its ops timed (seconds summed per op; synchronised on a GPU)."""

    def __init__(self, backend, sync):
        super().__init__(name=backend.name, seconds=dict.fromkeys(TIMED_OPS, 0.0))
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


def size_of(quick):
    return 129 if quick else 473


def masks_of(batch, shots, size):
    masks = torch.zeros(batch, shots, size, size, dtype=torch.long)
    lo, hi = int(size * 0.2), int(size * 0.2) + int(size * 0.3 ** 0.5)  # a box covering 30 % of the image
    masks[..., lo:hi, lo:hi] = 1
    return masks


def episode(shots, quick, device, batch=2):
    size = size_of(quick)
    g = torch.Generator().manual_seed(0)
    masks = masks_of(batch, shots, size)
    b = dict(query_img=torch.randn(batch, 3, size, size, generator=g),
             support_imgs=torch.randn(batch, shots, 3, size, size, generator=g), support_masks=masks,
             query_mask=masks[:, 0].roll(10, -1), classes=torch.ones(batch, 1, dtype=torch.long),
             index=torch.arange(batch))
    return {k: v.to(device) for k, v in b.items()}


def model_fn(side, case, quick, device, batch=None):
    """(the call to time, its TimedBackend) for a model case."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="umtfss", backbone="mobilenet_v2" if quick else "resnet50_v2", params={"profile": "paper"})
    model = UMTFSS(cfg, get_backend(side)).to(device)
    timed = model.backend = TimedBackend(model.backend, device_sync(device))
    batch = batch or episode(case["shots"], quick, device)
    if case["mode"] == "infer":
        model.eval()

        def infer():
            with torch.no_grad():
                return model(batch)["logits"]
        return infer, timed
    model.train()
    optimizers = build_optimizers(model, TrainConfig(lr=0.01))

    def train():
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        model(batch)["losses"]["dice"].backward()
        for opt in optimizers:
            opt.step()
    return train, timed


def proto_fn(side, case, quick, device):
    """The prototype step alone: support_prototypes on (2, K, 256, h, w) tokens, forward + backward."""
    h = (size_of(quick) - 1) // 8 + 1
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, case["shots"], 256, h, h, generator=g).to(device).requires_grad_()
    masks = masks_of(2, case["shots"], size_of(quick)).float().to(device)
    timed = TimedBackend(get_backend(side), device_sync(device))

    def step():
        protos, _ = timed.support_prototypes(features, masks, k_fg=50, k_bg=100, bits=32, iters=10,
                                             generator=torch.Generator().manual_seed(1))
        protos.sum().backward()
    return step, timed


def build(side, index, quick, device):
    case = CASES[index]
    return (proto_fn if case["mode"] == "proto" else model_fn)(side, case, quick, device)


def op_shares(fn, timed, sync):
    timed.seconds.update(dict.fromkeys(TIMED_OPS, 0.0))
    sync()
    start = time.perf_counter()
    fn()
    sync()
    total = time.perf_counter() - start
    return {op: s / total for op, s in timed.seconds.items()}


def memory_child(index, side, quick):
    """Child process (CPU): warm the libraries up at a small size, then the peak extra RSS of one call."""
    device = torch.device("cpu")
    case = CASES[index]
    if case["mode"] != "proto":
        model_fn(side, case, True, device, episode(case["shots"], True, device, batch=1))[0]()
    fn, _ = build(side, index, quick, device)
    print(json.dumps({"peak_extra_bytes": peak_extra_bytes(fn)}))


def peak_memory(index, fns, quick, device):
    if device.type == "cuda":
        return [cuda_peak_extra_bytes(fn) for fn in fns]
    out = []
    for side in ("reference", "fused"):
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
        built = [build(side, index, args.quick, device) for side in ("reference", "fused")]
        fns = [fn for fn, _ in built]
        start = time.perf_counter()
        t_ref, t_fused = median_times(fns, args.reps, sync=sync)
        shares = [op_shares(fn, timed, sync) for fn, timed in built]
        print(f"case {index}: timed in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        m_ref, m_fused = peak_memory(index, fns, args.quick, device)
        row = dict(case, reference_s=t_ref, fused_s=t_fused, speedup=t_ref / t_fused,
                   reference_peak_extra_mb=m_ref / 2**20, fused_peak_extra_mb=m_fused / 2**20,
                   memory_ratio=m_fused / m_ref if m_ref > 0 else None,
                   reference_op_share=shares[0], fused_op_share=shares[1], reps=args.reps)
        rows.append(row)
        print(json.dumps(row), flush=True)
        del built, fns
    return rows


def verdict(r):
    target = TARGETS.get((r["shots"], r["mode"]))
    if target is None:
        return "-"
    met = r["speedup"] >= target
    if r["mode"] == "train":
        met = met and r["memory_ratio"] is not None and r["memory_ratio"] <= MEMORY_TARGET
    return f"{'met' if met else 'missed'} (>= {target:g}x" + (f", memory <= {MEMORY_TARGET})" if r["mode"] == "train"
                                                              else ")")


def report(rows, info, args):
    size = "MobileNetV2, 129 x 129 (quick)" if args.quick else "ResNet-50 (deep stem, OS 8), 473 x 473"
    lines = [f"# UMTFSS: training step, inference and the prototype step, ops=fused vs ops=reference ({size}, "
             "batch 2, K_fg / K_bg 50 / 100)", "",
             f"Machine: {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['torch_threads']} torch threads)"
             f"{', GPU ' + info['gpu'] if info.get('gpu') else ''}; torch {info['torch']}.",
             f"Command: `python benchmarks/models/umtfss.py {' '.join(sys.argv[1:])}`; median of {args.reps} "
             "interleaved samples after a warm-up; memory = peak extra "
             f"{'device memory (allocator)' if info.get('gpu') else 'resident memory, one fresh process per side'}.",
             "Targets (issue 15, at the paper's size): train step >= 1.1x (1-shot), >= 1.2x (5-shot), memory <= 0.7x; "
             "prototype step alone >= 50x.", "",
             "| shots | call | reference s | fused s | speedup | reference MB | fused MB | memory ratio "
             "| prototypes ref / fused | proto attention ref / fused | prior ref / fused | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = lambda op: f"{r['reference_op_share'][op]:.1%} / {r['fused_op_share'][op]:.1%}"  # noqa: E731
        ratio = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "-"
        lines.append(f"| {r['shots']} | {r['mode']} | {r['reference_s']:.3f} | {r['fused_s']:.4f} | "
                     f"{r['speedup']:.2f}x | {r['reference_peak_extra_mb']:.0f} | {r['fused_peak_extra_mb']:.0f} | "
                     f"{ratio} | {share('support_prototypes')} | {share('prototype_attention')} | "
                     f"{share('prior_mask')} | {verdict(r) if not args.quick else '- (quick)'} |")
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
    stem = "umtfss" + ("-quick" if args.quick else "") + ("-cuda" if args.device.startswith("cuda") else "")
    out = HERE.parent / "results" / "models"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "command": sys.argv[1:], "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(report(rows, info, args))
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
