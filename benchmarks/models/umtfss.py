"""UMTFSS at the paper's size: one training step and one inference, ``ops=fused`` against ``ops=reference``, and the
prototype step (``support_prototypes``) alone.

    python benchmarks/models/umtfss.py              # ResNet-50 (deep stem, OS 8), 473 x 473, batch 2
    python benchmarks/models/umtfss.py --quick      # MobileNetV2 at 129 x 129 (17 x 17 tokens): a smoke run
    python benchmarks/models/umtfss.py --only 4 5   # the prototype step alone (cheap at any size)
    python benchmarks/models/umtfss.py --only 0 --dropout 0   # CPU: dense attention on the flash kernel
    python benchmarks/models/umtfss.py --device cuda

Cases: {1-shot, 5-shot} x {train step, inference} of the whole model (paper profile: K_fg / K_bg 50 / 100, d 256),
then the prototype step alone at 1 and 5 shots: ``support_prototypes`` forward + backward through the cluster
means on (2, K, 256, h, w) support tokens. Per case: the median time of each side (runs interleaved,
benchmarks/harness.py), the peak extra memory of one call (CPU: resident memory in a fresh process per side; GPU:
the caching allocator's peak), their ratios from this one run, and the share of the call each backend op takes (an
instrumented call per side, the ops timed where the model calls them, forward/backward). A training step is
zero_grad + forward + backward + both optimisers' steps (SGD for the convolutions, AdamW for the Transformer, as
the engine builds them);
inference is an eval-mode forward without autograd (clustering seeded per episode). Weights are random; the
support masks hold a 30 % foreground box. The reference clusters in PyTorch loops per image, as the public code.
Writes benchmarks/results/models/umtfss{,-quick}.{json,md} (with --device cuda: umtfss-cuda.*).
"""
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import (SIDES, ForwardBackwardTimedBackend, box_episode, box_masks, header, op_shares,  # noqa: E402
                    paired_row, parser, peak_memory, print_peak_memory, run, share_cell, step_fn)
from harness import device_sync, median_times  # noqa: E402

from fsskern.backend import get_backend  # noqa: E402
from fsskern.engine.config import ModelConfig, TrainConfig  # noqa: E402
from fsskern.engine.optim import build_optimizers  # noqa: E402
from fsskern.models.umtfss import UMTFSS  # noqa: E402

TIMED_OPS = ("support_prototypes", "prototype_attention", "prior_mask", "masked_average_pool")
TARGETS = {(1, "train"): 1.1, (5, "train"): 1.2, (1, "proto"): 50.0, (5, "proto"): 50.0}
MEMORY_TARGET = 0.7
CASES = [dict(shots=k, mode=m) for m in ("train", "infer") for k in (1, 5)] + \
        [dict(shots=k, mode="proto") for k in (1, 5)]


def size_of(quick):
    return 129 if quick else 473


PARAMS = {"profile": "paper"}  # main() adds --dropout


def episode(shots, quick, device, batch=2):
    return box_episode(batch, shots, size_of(quick), device, classes=torch.ones(batch, 1, dtype=torch.long),
                       index=torch.arange(batch))


def model_fn(side, case, quick, device, batch=None):
    """(the call to time, its TimedBackend) for a model case."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="umtfss", backbone="mobilenet_v2" if quick else "resnet50_v2", params=dict(PARAMS))
    model = UMTFSS(cfg, get_backend(side)).to(device)
    timed = model.backend = ForwardBackwardTimedBackend(model.backend, TIMED_OPS, device_sync(device))
    batch = batch or episode(case["shots"], quick, device)
    if case["mode"] == "infer":
        return step_fn(model, batch, "infer"), timed
    model.train()
    optimizers = build_optimizers(model, TrainConfig(lr=0.01))  # SGD + AdamW, not common's single SGD

    def train(other=None):  # other: the memory child's warm-up batch, through the same model and optimizers
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        model(batch if other is None else other)["losses"]["dice"].backward()
        for opt in optimizers:
            opt.step()
    return train, timed


def proto_fn(side, case, quick, device):
    """The prototype step alone: support_prototypes on (2, K, 256, h, w) tokens, forward + backward."""
    h = (size_of(quick) - 1) // 8 + 1
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, case["shots"], 256, h, h, generator=g).to(device).requires_grad_()
    masks = box_masks(2, case["shots"], size_of(quick)).float().to(device)
    timed = ForwardBackwardTimedBackend(get_backend(side), TIMED_OPS, device_sync(device))

    def step():
        protos, _ = timed.support_prototypes(features, masks, k_fg=50, k_bg=100, bits=32, iters=10,
                                             generator=torch.Generator().manual_seed(1))
        protos.sum().backward()
    return step, timed


def build(side, index, quick, device):
    case = CASES[index]
    return (proto_fn if case["mode"] == "proto" else model_fn)(side, case, quick, device)


def memory_child(index, side, quick):
    """Child process (CPU): warm the libraries up at a small size, then the peak extra RSS of one call."""
    device = torch.device("cpu")
    case = CASES[index]
    fn = build(side, index, quick, device)[0]
    small = episode(case["shots"], True, device, batch=1)
    if case["mode"] == "train":  # the measured call then finds the gradients and AdamW's state in place
        fn(small)
    elif case["mode"] == "infer":  # the measured architecture (quick or not) on the small batch
        model_fn(side, case, quick, device, small)[0]()
    else:  # proto: the step itself, which is small
        fn()
    print_peak_memory(fn)


def measure(index, case, args):
    device = torch.device(args.device)
    sync = device_sync(device)
    built = [build(side, index, args.quick, device) for side in SIDES]
    fns = [fn for fn, _ in built]
    start = time.perf_counter()
    t_ref, t_fused = median_times(fns, args.reps, sync=sync)
    shares = [op_shares(fn, timed, sync) for fn, timed in built]
    print(f"case {index}: timed in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    m_ref, m_fused = peak_memory(fns, device, [__file__] + (["--quick"] if args.quick else []) +
                                 (["--dropout", str(args.dropout)] if args.dropout is not None else []) +
                                 ["--memory", str(index)])
    return paired_row(case, (t_ref, t_fused), (m_ref, m_fused), shares, args.reps)


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
             "batch 2, K_fg / K_bg 50 / 100" + (f", Transformer dropout {args.dropout:g}" if args.dropout is not None
                                                 else "") + ")", "",
             *header("umtfss", info, args.reps),
             "Targets (issue 15, at the paper's size): train step >= 1.1x (1-shot), >= 1.2x (5-shot), memory <= 0.7x; "
             "prototype step alone >= 50x. Op shares: forward/backward.", "",
             "| shots | call | reference s | fused s | speedup | reference MB | fused MB | memory ratio "
             "| prototypes ref / fused | proto attention ref / fused | prior ref / fused | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "-"
        lines.append(f"| {r['shots']} | {r['mode']} | {r['reference_s']:.3f} | {r['fused_s']:.4f} | "
                     f"{r['speedup']:.2f}x | {r['reference_peak_extra_mb']:.0f} | {r['fused_peak_extra_mb']:.0f} | "
                     f"{ratio} | {share_cell(r, 'support_prototypes')} | {share_cell(r, 'prototype_attention')} | "
                     f"{share_cell(r, 'prior_mask')} | {verdict(r) if not args.quick else '- (quick)'} |")
    return "\n".join(lines) + "\n"


def main():
    p = parser(__doc__)
    p.add_argument("--dropout", type=float, help="the Transformer's dropout (paper 0.1). On a CPU, dropout sends the "
                   "dense self-attention to SDPA's math path, which keeps the 8-head attention maps for backward; "
                   "with 0 it takes the flash kernel, as a GPU does with dropout")
    args = p.parse_args()
    if args.dropout is not None:
        PARAMS["dropout"] = args.dropout
    if args.memory:
        return memory_child(int(args.memory[0]), args.memory[1], args.quick)
    run("umtfss", args, CASES, measure, report)


if __name__ == "__main__":
    main()
