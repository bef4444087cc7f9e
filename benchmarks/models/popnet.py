"""POPNet at the paper's size: one stage-3 training step and one inference, ``ops=fused`` against ``ops=reference``.

    python benchmarks/models/popnet.py             # DeepLabV3+ ResNet-50 (OS 16), 512 x 512, batch 2, 12 ways
    python benchmarks/models/popnet.py --quick     # DeepLabV3+ MobileNetV2 at 97 x 97: a smoke run
    python benchmarks/models/popnet.py --device cuda

Cases: {stage-3 train step, inference}, fp32, k-way one-shot episodes as the loader builds them (one support image
annotated with every way, encoded once). Per case: the median time of each side (runs interleaved,
benchmarks/harness.py), the peak extra memory of one call (CPU: resident memory in a fresh process per side; GPU:
the caching allocator's peak), their ratios from this one run, and the share of the call the model's one backend op
(``class_prototypes``, Eq. 1) and stage 3's AGM take, forward and backward (common.py's
ForwardBackwardTimedBackend). The training step (zero_grad + forward + backward + SGD step, common.py's ``step_fn``)
runs all three encoders (stages 1-2 frozen, no grad) and is taken at epoch 15 of 30 (beta 0.5, dynamic prototypes):
both heads' losses, the bank read and written. Inference is an eval-mode forward without autograd: the NCM head
predicts and the AGM is not computed (R11); the inference row also times the forward with the AGM computed and says
whether the output differs. The report says whether the time gap between the sides exceeds the op's whole time (then
it is not the op's: the rest of the model is the same code on both sides). Weights are random; the labels are a 4 x
3 grid of part blocks, the query's shifted by a tenth.
Writes benchmarks/results/models/popnet{,-quick}{,-cuda}{,-TAG}.{json,md}.
"""
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import (SIDES, ForwardBackwardTimedBackend, header, op_shares, paired_cells, paired_row,  # noqa: E402
                    parser, peak_memory, print_peak_memory, run, step_fn, verdict)
from harness import device_sync, median_times  # noqa: E402

from fsskern.backend import get_backend  # noqa: E402
from fsskern.engine.config import ModelConfig  # noqa: E402
from fsskern.models.popnet import POPNet  # noqa: E402

TIMED_OPS = ("class_prototypes",)
TARGETS = {"speedup": 1.0, "memory_ratio": 1.0}  # stage-3 training step: fused not slower, peak memory no higher
CASES = [dict(mode=m) for m in ("train", "infer")]
WAYS, ITERS, WEIGHT_DECAY = 12, 120000, 5e-4


def build(side, quick, device):
    torch.manual_seed(0)
    cfg = ModelConfig(name="popnet", backbone="deeplabv3plus_mobilenet_v2" if quick else "deeplabv3plus_resnet50",
                      weights=None, freeze_backbone=False, params={"stage": 3, "iters": ITERS})
    model = POPNet(cfg, get_backend(side)).to(device)
    model.steps[3] = ITERS // 2  # epoch 15 of 30: beta 0.5, past the static phase
    model.backend = ForwardBackwardTimedBackend(model.backend, TIMED_OPS, device_sync(device))
    head = model.heads["3"]
    head.agm = model.backend.also("agm", head.agm)  # its share of the training step (inference skips it)
    return model


def episode(size, device, batch=2):
    """Labels: a 4 x 3 grid of blocks (ways 1..12) over the central 80 % of the image, background around it; the
    query's shifted right by a tenth of the side. One support image per episode, repeated for every way."""
    g = torch.Generator().manual_seed(0)
    lo, hi = size // 10, size - size // 10
    rows = ((torch.arange(size) - lo) * 4 // (hi - lo)).clamp(0, 3)
    cols = ((torch.arange(size) - lo) * 3 // (hi - lo)).clamp(0, 2)
    label = rows[:, None] * 3 + cols[None] + 1
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[lo:hi, lo:hi] = True
    label = torch.where(inside, label, 0).expand(batch, size, size)
    support = torch.randn(batch, 1, 3, size, size, generator=g).expand(-1, WAYS, -1, -1, -1).contiguous()
    b = dict(query_img=torch.randn(batch, 3, size, size, generator=g), support_imgs=support,
             support_masks=torch.stack([(label == w + 1).long() for w in range(WAYS)], 1),
             query_mask=label.roll(size // 10, -1).contiguous(),
             classes=torch.arange(1, WAYS + 1).expand(batch, WAYS).contiguous(), index=torch.arange(batch))
    return {k: v.to(device) for k, v in b.items()}


def size_of(quick):
    return 97 if quick else 512


def memory_child(index, side, quick):
    """Child process (CPU): warm the libraries up at a small size, then the peak extra RSS of one call."""
    case, device = CASES[index], torch.device("cpu")
    model = build(side, quick, device)
    step_fn(model, episode(65, device), case["mode"], weight_decay=WEIGHT_DECAY)()
    print_peak_memory(step_fn(model, episode(size_of(quick), device), case["mode"], weight_decay=WEIGHT_DECAY))


def with_agm(model):
    """The eval-mode forward with the AGM computed as in training (its logits dropped): what R11 skips."""
    head = model.heads["3"]
    forward = head.forward
    head.forward = lambda h_q, m, present, agm, **kw: forward(h_q, m, present, True, **kw)
    return model


def measure(index, case, args):
    device = torch.device(args.device)
    sync = device_sync(device)
    models = [build(side, args.quick, device) for side in SIDES]
    batch = episode(size_of(args.quick), device)
    fns = [step_fn(m, batch, case["mode"], weight_decay=WEIGHT_DECAY) for m in models]
    extra = {}
    if case["mode"] == "infer":  # the fused model once more, computing the AGM it skips
        agm_fn = step_fn(with_agm(build("fused", args.quick, device)), batch, "infer")
        times = median_times(fns + [agm_fn], args.reps, sync=sync)
        diff = float((fns[1]() - agm_fn()).abs().max())
        extra = dict(agm_computed_s=times.pop(), agm_skip_max_abs_diff=diff, agm_skip_changes_output=diff > 0)
    else:
        times = median_times(fns, args.reps, sync=sync)
    shares = [op_shares(fn, m.backend, sync) for fn, m in zip(fns, models)]
    child = [__file__] + (["--quick"] if args.quick else []) + ["--memory", str(index)]
    return dict(paired_row(case, times, peak_memory(fns, device, child), shares, args.reps), **extra)


def _share(row, side, part="class_prototypes"):
    s = row[f"{side}_op_share"][part]
    return f"{s['forward']:.2%}/{s['backward']:.2%}"


def report(rows, info, args):
    net = "DeepLabV3+ MobileNetV2, 97 x 97 (quick)" if args.quick else "DeepLabV3+ ResNet-50 (OS 16), 512 x 512"
    lines = [f"# POPNet: stage-3 training step and inference, ops=fused vs ops=reference ({net}, batch 2, "
             f"{WAYS} ways)", "", *header("popnet", info, args.reps),
             f"Target (training step): speedup >= {TARGETS['speedup']}x, memory ratio <= {TARGETS['memory_ratio']}. "
             "Op share: forward/backward of class_prototypes; AGM share: forward/backward of stage 3's "
             "Attention Guidance Module.", "",
             "| call | reference s | fused s | speedup | reference MB | fused MB | memory ratio | op share reference "
             "| op share fused | AGM share reference | AGM share fused | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        target = verdict(r, TARGETS) if r["mode"] == "train" else "-"
        agm = [_share(r, side, "agm") if "agm" in r[f"{side}_op_share"] else "-" for side in SIDES]
        lines.append(f"| {r['mode']} | {paired_cells(r)} | {_share(r, 'reference')} | {_share(r, 'fused')} | "
                     f"{agm[0]} | {agm[1]} | {target} |")
    for r in rows:  # the sides differ only in the op: a gap larger than the op's whole time is not the op's
        gap = abs(r["reference_s"] - r["fused_s"])
        op_s = max(sum(r[f"{side}_op_share"]["class_prototypes"].values()) * r[f"{side}_s"] for side in SIDES)
        lines += ["", f"{r['mode']}: the gap between the sides ({gap:.3f} s) is {'' if gap > op_s else 'not '}larger "
                  f"than the op's whole time on either side (at most {op_s * 1e3:.1f} ms)."]
        if "agm_computed_s" in r:
            output = f"changes (max abs diff {r['agm_skip_max_abs_diff']:.3g})" if r["agm_skip_changes_output"] \
                else "is identical"
            lines += ["", f"Inference with the AGM computed (fused): {r['agm_computed_s']:.3f} s against "
                      f"{r['fused_s']:.3f} s skipped; the output {output} when it is skipped (the NCM head predicts "
                      "either way)."]
    return "\n".join(lines) + "\n"


def main():
    args = parser(__doc__).parse_args()
    if args.memory:
        return memory_child(int(args.memory[0]), args.memory[1], args.quick)
    run("popnet", args, CASES, measure, report)


if __name__ == "__main__":
    main()
