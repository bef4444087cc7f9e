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
step: benchmarks/models/common.py's ``step_fn``) runs the refinement loop with T fixed at 4, the largest draw of
the training schedule, so both sides do the same work; inference is 10 refinement steps, single scale. Random
weights; the support masks hold a 30 % foreground box.
Writes benchmarks/results/models/crcnet{,-quick}{,-cuda}.{json,md}.
"""
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import (SIDES, TimedBackend, box_episode, header, op_shares, paired_cells, paired_row,  # noqa: E402
                    parser, peak_memory, print_peak_memory, run, share_cell, step_fn, verdict)
from harness import device_sync, median_times  # noqa: E402

from fsskern.backend import get_backend  # noqa: E402
from fsskern.engine.config import ModelConfig  # noqa: E402
from fsskern.models.crcnet import CRCNet  # noqa: E402

TIMED_OPS = ("local_conditional_attention", "masked_average_pool")
TARGETS = {473: {"speedup": 1.05, "memory_ratio": 0.8}}


def cases(args):
    sizes = [97] if args.quick else args.sizes
    return [dict(size=s, shots=k, mode=m) for s in sizes for k in args.shots for m in ("train", "infer")]


def build(side, quick, device):
    torch.manual_seed(0)
    model = CRCNet(ModelConfig(name="crcnet", backbone="mobilenet_v2" if quick else "resnet50"), get_backend(side))
    model._train_steps = lambda: 4  # the same refinement work on both sides (see the module docstring)
    model.backend = TimedBackend(model.backend, TIMED_OPS, device_sync(device))
    return model.to(device)


def episode(size, shots, device):
    return box_episode(2, shots, size, device, classes=torch.ones(2, 1).long())


def memory_child(index, side, args):
    """Child process (CPU): warm the libraries up at a small size, then the peak extra RSS of one call."""
    case, device = cases(args)[index], torch.device("cpu")
    model = build(side, args.quick, device)
    step_fn(model, episode(65, case["shots"], device), case["mode"])()
    print_peak_memory(step_fn(model, episode(case["size"], case["shots"], device), case["mode"]))


def measure(index, case, args):
    device = torch.device(args.device)
    sync = device_sync(device)
    models = [build(side, args.quick, device) for side in SIDES]
    batch = episode(case["size"], case["shots"], device)
    fns = [step_fn(m, batch, case["mode"]) for m in models]
    times = median_times(fns, args.reps, sync=sync)
    shares = [op_shares(fn, m.backend, sync) for fn, m in zip(fns, models)]
    child = [__file__, "--shots", *map(str, args.shots), "--sizes", *map(str, args.sizes)] + \
        (["--quick"] if args.quick else []) + ["--memory", str(index)]
    return paired_row(case, times, peak_memory(fns, device, child), shares, args.reps)


def report(rows, info, args):
    net = "MobileNetV2 (quick)" if args.quick else "ResNet-50 (torchvision stem, OS 8)"
    lines = [f"# CRCNet: training step and 10-step inference, ops=fused vs ops=reference ({net}, batch 2)", "",
             *header("crcnet", info, args.reps),
             "Targets (473, 1-shot): speedup >= 1.05x, memory ratio <= 0.8.", "",
             "| size | shots | call | reference s | fused s | speedup | reference MB | fused MB | memory ratio "
             "| local share ref / fused | MAP share ref / fused | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        goal = TARGETS.get(r["size"]) if r["shots"] == 1 else None
        target = "-" if goal is None else verdict(r, goal)
        lines.append(f"| {r['size']} | {r['shots']} | {r['mode']} | {paired_cells(r)} | "
                     f"{share_cell(r, 'local_conditional_attention')} | {share_cell(r, 'masked_average_pool')} | "
                     f"{target} |")
    return "\n".join(lines) + "\n"


def main():
    p = parser(__doc__)
    p.add_argument("--shots", type=int, nargs="+", default=[1])
    p.add_argument("--sizes", type=int, nargs="+", default=[321, 473], help="input sides (not with --quick)")
    args = p.parse_args()
    if args.memory:
        return memory_child(int(args.memory[0]), args.memory[1], args)
    run("crcnet", args, cases(args), measure, report)


if __name__ == "__main__":
    main()
