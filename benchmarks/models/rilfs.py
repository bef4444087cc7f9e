"""RILFS at the paper's size: one training step and one inference, ``ops=fused`` against ``ops=reference``.

    python benchmarks/models/rilfs.py              # ResNet-50 (deep stem, OS 8), 473 x 473, batch 2
    python benchmarks/models/rilfs.py --quick      # MobileNetV2 at 129 x 129: a smoke run
    python benchmarks/models/rilfs.py --device cuda
    python benchmarks/models/rilfs.py --prior-search bf16   # the fused prior's certified bf16 search

Cases: {1-shot, 5-shot} x {train step, inference} in fp32, and 1-shot under bf16 autocast (--bf16-5shot
adds 5-shot). Per case: the median time of each side (runs interleaved, benchmarks/harness.py), the peak
extra memory of one call (CPU: resident memory in a fresh process per side; GPU: the caching
allocator's peak), their ratios from this one run, and the share of the call that each backend op takes
(an instrumented call per side: ``prior_mask`` and ``masked_average_pool`` timed where the model calls
them, forward and backward). A training step is zero_grad + forward + backward + SGD step; inference is an
eval-mode forward without autograd. Weights are random (the timings do not depend on them); the support masks
hold a 30 % foreground box, so the fused prior skips 70 % of the support pixels as it would on real masks.
Writes benchmarks/results/models/rilfs{,-quick}.{json,md} (with --device cuda: rilfs-cuda.*).
"""
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import (SIDES, ForwardBackwardTimedBackend, box_episode, header, op_shares, paired_cells,  # noqa: E402
                    paired_row, parser, peak_memory, print_peak_memory, run, share_cell, step_fn, verdict)
from harness import device_sync, median_times  # noqa: E402

from fsskern.backend import get_backend  # noqa: E402
from fsskern.engine.config import ModelConfig  # noqa: E402
from fsskern.models.rilfs import RILFS  # noqa: E402

TIMED_OPS = ("prior_mask", "masked_average_pool")
TARGETS = {"speedup": 1.15, "memory_ratio": 0.7}
PARAMS = {}  # main() adds --prior-search


def cases(bf16_5shot=False):
    out = [dict(shots=k, mode=m, amp="none") for k in (1, 5) for m in ("train", "infer")]
    out += [dict(shots=k, mode=m, amp="bf16") for k in ((1, 5) if bf16_5shot else (1,)) for m in ("train", "infer")]
    return out


def build(side, shots, quick, device):
    torch.manual_seed(0)
    cfg = ModelConfig(name="rilfs", backbone="mobilenet_v2" if quick else "resnet50_v2",
                      params={"shots": shots, **PARAMS})
    model = RILFS(cfg, get_backend(side)).to(device)
    model.backend = ForwardBackwardTimedBackend(model.backend, TIMED_OPS, device_sync(device))
    return model


def episode(shots, quick, device, batch=2):
    b = box_episode(batch, shots, 129 if quick else 473, device, classes=torch.ones(batch, 1, dtype=torch.long))
    b["base_label"] = b["query_mask"] * 3
    return b


def memory_child(index, side, quick, bf16_5shot):
    """Child process (CPU): warm the libraries up at a small size, then the peak extra RSS of one call."""
    case, device = cases(bf16_5shot)[index], torch.device("cpu")
    model = build(side, case["shots"], quick, device)
    step_fn(model, episode(case["shots"], True, device, batch=1), case["mode"], case["amp"], device)()
    print_peak_memory(step_fn(model, episode(case["shots"], quick, device), case["mode"], case["amp"], device))


def measure(index, case, args):
    device = torch.device(args.device)
    sync = device_sync(device)
    models = [build(side, case["shots"], args.quick, device) for side in SIDES]
    batch = episode(case["shots"], args.quick, device)
    fns = [step_fn(m, batch, case["mode"], case["amp"], device) for m in models]
    start = time.perf_counter()
    times = median_times(fns, args.reps, sync=sync)
    # one instrumented call per side (the timed samples run the ops as they are; with one sample the shares had
    # come from the timed calls, whose count median_times varies with the call's length)
    shares = [op_shares(fn, m.backend, sync) for fn, m in zip(fns, models)]
    print(f"case {index}: timed in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    child = [__file__] + (["--quick"] if args.quick else []) + (["--bf16-5shot"] if args.bf16_5shot else []) + \
        ["--prior-search", args.prior_search, "--memory", str(index)]
    return paired_row(case, times, peak_memory(fns, device, child), shares, args.reps)


def report(rows, info, args):
    size = "MobileNetV2, 129 x 129 (quick)" if args.quick else "ResNet-50 (deep stem, OS 8), 473 x 473"
    search = f", prior_search {args.prior_search}" if args.prior_search != "fp32" else ""
    lines = [f"# RILFS: training step and inference, ops=fused vs ops=reference ({size}, batch 2{search})", "",
             *header("rilfs", info, args.reps),
             f"Targets (1-shot, fp32): speedup >= {TARGETS['speedup']}x, memory ratio <= {TARGETS['memory_ratio']}. "
             "Op shares: forward/backward (a backward only where gradients flow through the op).",
             "", "| shots | call | amp | reference s | fused s | speedup | reference MB | fused MB | memory ratio "
             "| prior share ref / fused | MAP share ref / fused | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = verdict(r, TARGETS) if (r["shots"], r["amp"]) == (1, "none") else "-"
        lines.append(f"| {r['shots']} | {r['mode']} | {r['amp']} | {paired_cells(r)} | {share_cell(r, 'prior_mask')} | "
                     f"{share_cell(r, 'masked_average_pool')} | {target} |")
    return "\n".join(lines) + "\n"


def main():
    p = parser(__doc__)
    p.add_argument("--bf16-5shot", action="store_true")
    p.add_argument("--prior-search", choices=("fp32", "bf16"), default="fp32",
                   help="model.params.prior_search (bf16: the certified search, on bf16 hardware)")
    args = p.parse_args()
    PARAMS["prior_search"] = args.prior_search
    if args.memory:
        return memory_child(int(args.memory[0]), args.memory[1], args.quick, args.bf16_5shot)
    run("rilfs", args, cases(args.bf16_5shot), measure, report)


if __name__ == "__main__":
    main()
