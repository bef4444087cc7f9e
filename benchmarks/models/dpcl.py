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
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import (SIDES, ForwardBackwardTimedBackend, box_episode, header, op_shares, paired_cells,  # noqa: E402
                    parser, peak_memory, print_peak_memory, run, step_fn, verdict)
from harness import device_sync, median_times  # noqa: E402

from fsskern.backend import get_backend  # noqa: E402
from fsskern.engine.config import ModelConfig  # noqa: E402
from fsskern.models.dpcl import DPCL  # noqa: E402

TIMED_OPS = ("masked_average_pool", "class_prototypes")
TARGETS = {"speedup": 1.3, "memory_ratio": 0.4}  # training step, 1- and 5-shot (issue 14)
CASES = [dict(shots=k, mode=m) for k in (1, 5) for m in ("train", "infer")]
WEIGHT_DECAY = 5e-4


def build(side, quick, device):
    torch.manual_seed(0)
    # quick: MobileNetV2 without dilation (torch's CPU backward of dilated depthwise convs is ~30x slower)
    cfg = ModelConfig(name="dpcl", backbone="mobilenet_v2" if quick else "resnet50", freeze_backbone=False,
                      params={"output_stride": 32} if quick else {})
    model = DPCL(cfg, get_backend(side)).to(device)
    model.backend = ForwardBackwardTimedBackend(model.backend, TIMED_OPS, device_sync(device))
    return model


def episode(shots, quick, device, batch=2):
    return box_episode(batch, shots, 129 if quick else 473, device,
                       classes=torch.arange(1, batch + 1).view(batch, 1), index=torch.arange(batch))


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
    step_fn(model, episode(case["shots"], True, device, batch=1), case["mode"], weight_decay=WEIGHT_DECAY)()
    print_peak_memory(step_fn(model, episode(case["shots"], quick, device), case["mode"], weight_decay=WEIGHT_DECAY))


def measure(index, case, args):
    device = torch.device(args.device)
    sync = device_sync(device)
    need = reference_bytes_estimate(case["shots"], args.quick)
    free = torch.cuda.mem_get_info()[0] if device.type == "cuda" else available_bytes()
    sides = SIDES if need < 0.8 * free else ("fused",)
    models = [build(side, args.quick, device) for side in sides]
    batch = episode(case["shots"], args.quick, device)
    fns = [step_fn(m, batch, case["mode"], weight_decay=WEIGHT_DECAY) for m in models]
    times = median_times(fns, args.reps, sync=sync)
    shares = [op_shares(fn, m.backend, sync) for fn, m in zip(fns, models)]
    peaks = peak_memory(fns, device, [__file__] + (["--quick"] if args.quick else []) + ["--memory", str(index)], sides)
    row = dict(case, reps=args.reps, reference_estimate_gb=need / 1e9, available_gb=free / 1e9,
               fused_s=times[-1], fused_peak_extra_mb=peaks[-1] / 2**20, fused_op_share=shares[-1])
    if len(sides) == 2:
        row.update(reference_s=times[0], speedup=times[0] / times[1], reference_peak_extra_mb=peaks[0] / 2**20,
                   memory_ratio=peaks[1] / peaks[0] if peaks[0] else None, reference_op_share=shares[0])
    return row


def _share(share):
    return " + ".join(f"{share[op]['forward']:.1%}/{share[op]['backward']:.1%}" for op in TIMED_OPS)


def report(rows, info, args):
    size = "MobileNetV2, 129 x 129 (quick)" if args.quick else "ResNet-50 (OS 8, 1536-d heads), 473 x 473"
    lines = [f"# DPCL: training step and inference, ops=fused vs ops=reference ({size}, batch 2)", "",
             *header("dpcl", info, args.reps),
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
        target = verdict(r, TARGETS) if r["mode"] == "train" else "-"
        lines.append(f"| {r['shots']} | {r['mode']} | {paired_cells(r, digits=2)} | "
                     f"{_share(r['reference_op_share'])} | {_share(r['fused_op_share'])} | {target} |")
    return "\n".join(lines) + "\n"


def main():
    p = parser(__doc__)
    args = p.parse_args()
    if args.memory:
        return memory_child(int(args.memory[0]), args.memory[1], args.quick)
    run("dpcl", args, CASES, measure, report)


if __name__ == "__main__":
    main()
