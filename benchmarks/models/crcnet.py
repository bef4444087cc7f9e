"""CRCNet at the paper's size: one training step and one 10-step inference, ``ops=fused`` against ``ops=reference``.

    python benchmarks/models/crcnet.py              # ResNet-50 (torchvision stem, OS 8), 321 and 473, batch 2
    python benchmarks/models/crcnet.py --quick      # MobileNetV2 at 97 x 97: a smoke run
    python benchmarks/models/crcnet.py --device cuda --shots 1 5
    python benchmarks/models/crcnet.py --sizes 321 --reps 1   # one size, one sample per side (slow CPUs)
    python benchmarks/models/crcnet.py --finetune --sizes 473 --reps 1   # the 5-shot test-time fine-tuning
    python benchmarks/models/crcnet.py --finetune --sizes 473 --ft-steps 2 12   # its cost per step, 100 extrapolated

Cases: {321, 473} x {train step, inference} x shots (1 by default). Per case: the median time of each side
(interleaved samples, benchmarks/harness.py), the peak extra memory of one call (CPU: resident memory in a
fresh process per side; GPU: the caching allocator's peak), their ratios from this one run, and the share of the
call taken by the local conditional module's attention (``local_conditional_attention``) and by
``masked_average_pool``, timed where the model calls them, forward/backward. The training step (zero_grad,
forward, backward, SGD step: benchmarks/models/common.py's ``step_fn``) runs the refinement loop with T fixed at
4, the largest draw of the training schedule, so both sides do the same work; inference is 10 refinement steps,
single scale. Random weights; the support masks hold a 30 % foreground box.
``--finetune``: instead, one 5-shot evaluation episode (batch 1) with ``kshot="finetune"``, the paper's test-time
k-shot fine-tuning (4.6): the encoder runs once per image and its features are cached, then ``ft_steps`` (100)
SGD steps train only the modules after it, then the query is predicted and the weights restored. Its time is the
cost per episode. ``--ft-steps A B`` runs the episode with A and with B steps instead of 100: the difference is the
cost of B - A steps, so the report states the cost per step and an episode of 100 steps (fixed part + 100 steps)
where 100 steps per side would take too long (CPU, paper size).
Writes benchmarks/results/models/crcnet{,-finetune}{,-quick}{,-cuda}{,-TAG}.{json,md}.
"""
import sys
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
from fsskern.models.crcnet import CRCNet  # noqa: E402

TIMED_OPS = ("local_conditional_attention", "masked_average_pool")
TARGETS = {473: {"speedup": 1.05, "memory_ratio": 0.8}}


def cases(args):
    sizes = [97] if args.quick else args.sizes
    if args.finetune:
        return [dict(size=s, shots=5, mode="finetune", ft_steps=n) for s in sizes for n in args.ft_steps]
    return [dict(size=s, shots=k, mode=m) for s in sizes for k in args.shots for m in ("train", "infer")]


def build(side, quick, device, mode, ft_steps=100):
    torch.manual_seed(0)
    params = {"kshot": "finetune", "ft_steps": ft_steps} if mode == "finetune" else {}
    model = CRCNet(ModelConfig(name="crcnet", backbone="mobilenet_v2" if quick else "resnet50", params=params),
                   get_backend(side))
    model._train_steps = lambda: 4  # the same refinement work on both sides (see the module docstring)
    model.backend = ForwardBackwardTimedBackend(model.backend, TIMED_OPS, device_sync(device))
    return model.to(device)


def episode(size, shots, device, mode):
    batch = 1 if mode == "finetune" else 2  # fine-tuning is per episode
    return box_episode(batch, shots, size, device, classes=torch.ones(batch, 1).long())


def call(model, batch, mode):
    return step_fn(model, batch, "infer" if mode == "finetune" else mode)  # the model fine-tunes inside


def memory_child(index, side, args):
    """Child process (CPU): warm the libraries up at a small size, then the peak extra RSS of one call."""
    case, device = cases(args)[index], torch.device("cpu")
    model = build(side, args.quick, device, case["mode"], case.get("ft_steps", 100))
    call(model, episode(65, case["shots"], device, case["mode"]), case["mode"])()
    print_peak_memory(call(model, episode(case["size"], case["shots"], device, case["mode"]), case["mode"]))


def measure(index, case, args):
    device = torch.device(args.device)
    sync = device_sync(device)
    models = [build(side, args.quick, device, case["mode"], case.get("ft_steps", 100)) for side in SIDES]
    batch = episode(case["size"], case["shots"], device, case["mode"])
    fns = [call(m, batch, case["mode"]) for m in models]
    times = median_times(fns, args.reps, sync=sync)
    shares = [op_shares(fn, m.backend, sync) for fn, m in zip(fns, models)]
    child = [__file__, "--shots", *map(str, args.shots), "--sizes", *map(str, args.sizes)] + \
        (["--quick"] if args.quick else []) + \
        (["--finetune", "--ft-steps", *map(str, args.ft_steps)] if args.finetune else []) + ["--memory", str(index)]
    return paired_row(case, times, peak_memory(fns, device, child), shares, args.reps)


def report(rows, info, args):
    net = "MobileNetV2 (quick)" if args.quick else "ResNet-50 (torchvision stem, OS 8)"
    title = (f"one 5-shot episode with test-time fine-tuning ({' / '.join(map(str, args.ft_steps))} steps), batch 1"
             if args.finetune else "training step and 10-step inference, batch 2")
    lines = [f"# CRCNet: {title}, ops=fused vs ops=reference ({net})", "",
             *header("crcnet", info, args.reps),
             "Targets: none (the issue asks for the cost per episode)." if args.finetune else
             "Targets (473, 1-shot): speedup >= 1.05x, memory ratio <= 0.8.", "",
             "| size | shots | call | steps | reference s | fused s | speedup | reference MB | fused MB | memory ratio "
             "| local share ref / fused (fwd/bwd) | MAP share ref / fused (fwd/bwd) | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        goal = TARGETS.get(r["size"]) if r["shots"] == 1 else None
        target = "-" if goal is None else verdict(r, goal)
        lines.append(f"| {r['size']} | {r['shots']} | {r['mode']} | {r.get('ft_steps', '-')} | {paired_cells(r)} | "
                     f"{share_cell(r, 'local_conditional_attention')} | {share_cell(r, 'masked_average_pool')} | "
                     f"{target} |")
    return "\n".join(lines + extrapolated(rows)) + "\n"


def extrapolated(rows):
    """Fine-tuning episodes of one size at two step counts: the cost per step and of a 100-step episode."""
    lines = []
    for size in sorted({r["size"] for r in rows if r["mode"] == "finetune"}):
        runs = sorted((r["ft_steps"], r) for r in rows if r["mode"] == "finetune" and r["size"] == size)
        if len(runs) < 2 or runs[0][0] == runs[-1][0]:
            continue
        (a, ra), (b, rb) = runs[0], runs[-1]
        cells = []
        for side in SIDES:
            step = (rb[f"{side}_s"] - ra[f"{side}_s"]) / (b - a)
            cells.append(f"{side} {step:.2f} s per step, {ra[f'{side}_s'] + (100 - a) * step:.0f} s per 100-step "
                         "episode")
        lines += ["", f"At {size}, from the {a}- and {b}-step episodes: " + "; ".join(cells) + "."]
    return lines


def main():
    p = parser(__doc__)
    p.add_argument("--shots", type=int, nargs="+", default=[1])
    p.add_argument("--sizes", type=int, nargs="+", default=[321, 473], help="input sides (not with --quick)")
    p.add_argument("--finetune", action="store_true", help="the 5-shot test-time fine-tuning episode instead")
    p.add_argument("--ft-steps", type=int, nargs="+", default=[100],
                   help="fine-tuning steps per episode; two counts also give the cost per step")
    args = p.parse_args()
    if args.memory:
        return memory_child(int(args.memory[0]), args.memory[1], args)
    run("crcnet-finetune" if args.finetune else "crcnet", args, cases(args), measure, report)


if __name__ == "__main__":
    main()
