"""The attention ops under bf16 autocast against their float32 kernels, side by side in one run.

    python benchmarks/reduced_precision.py [--reps 3] [--out benchmarks/results]

Cases at the benchmark sizes: prototype attention B4 H8 N3600 D32 P70 (UMTFSS at 473) and local attention
B4 C256 60x60 with 30% foreground (CRCNet). Per case, the median time of the forward and of forward + backward
with float32 inputs, and with the same inputs in bf16 inside ``torch.autocast("cpu", dtype=torch.bfloat16)``
(as a model's layers hand them over), the two sides interleaved; their ratio (target >= 1.5x); and the largest
difference of the bf16 output from the float32 one, which is mostly the inputs' own rounding to bf16 (CRCNet's
logits are unscaled sums over 256 channels, so rounding q and k moves them by ~0.5). The header names the CPU's
bf16 capability and the kernels' path (``build_info()["bf16_attention"]``): with AVX512-BF16 they multiply bf16 in
bf16 (float32 sums); without it the bf16 inputs are widened to float32 before the float32 GEMMs, so only the
halved input traffic can help.
Writes OUT/reduced_precision.{json,md}.
"""
import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from fsskern import ops  # noqa: E402
from fsskern.ops.certified_search import bf16_hardware  # noqa: E402
from harness import machine_info, median_times  # noqa: E402


def prototype_case():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, 8, n, 32, generator=g) for n in (3600, 70, 70))
    return "prototype attention B4 H8 N3600 D32 P70", (q, k, v), lambda q, k, v: ops.prototype_attention(q, k, v)


def local_case():
    g = torch.Generator().manual_seed(0)
    query, support = torch.randn(4, 256, 3600, generator=g), torch.randn(4, 256, 3600, generator=g)
    mask = (torch.rand(4, 3600, generator=g) < 0.3).float()
    return ("local attention exclude B4 C256 60x60 30% fg", (query, support),
            lambda query, support: ops.local_conditional_attention(query, support, mask))


def measure(name, inputs, op, reps):
    # Under autocast a model's layers hand the ops bf16 tensors: the bf16 side starts from those, so the
    # casts of the inputs are not timed.
    bf16_inputs = [x.bfloat16() for x in inputs]

    def forward(amp):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            return op(*(bf16_inputs if amp else inputs))

    def train_step(amp):
        leaves = [x.detach().requires_grad_() for x in (bf16_inputs if amp else inputs)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = op(*leaves)
        out.sum().backward()

    row = {"case": name, "max_abs_diff": float((forward(True).float() - forward(False)).abs().max())}
    # fp32 and bf16 interleaved, so drift of the machine hits both
    row["forward_fp32_s"], row["forward_bf16_s"] = median_times([lambda: forward(False), lambda: forward(True)], reps)
    row["train_fp32_s"], row["train_bf16_s"] = median_times([lambda: train_step(False), lambda: train_step(True)],
                                                            reps)
    row["forward_speedup"] = row["forward_fp32_s"] / row["forward_bf16_s"]
    row["train_speedup"] = row["train_fp32_s"] / row["train_bf16_s"]
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    rows = [measure(*case(), args.reps) for case in (prototype_case, local_case)]
    hardware = bf16_hardware(torch.device("cpu")) or "none (no AMX-BF16 / AVX512-BF16)"
    info = {**machine_info(), "bf16_hardware": hardware, "threads": torch.get_num_threads()}  # the CPU and commit too
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reduced_precision.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    lines = ["# Attention under bf16 autocast vs the float32 kernels", "",
             f"torch {info['torch']}, {info['threads']} threads, CPU capability {info['cpu_capability']}, bf16 "
             f"matrix hardware: {hardware}, attention products: {info['bf16_attention']}. Command: "
             f"`python benchmarks/reduced_precision.py {' '.join(sys.argv[1:] if argv is None else argv)}`. "
             "Target: bf16 >= 1.5x the float32 kernel.", "",
             "| case | forward fp32 | forward bf16 | speedup | fwd+bwd fp32 | fwd+bwd bf16 | speedup "
             "| max abs diff of the outputs (inputs' rounding included) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {1e3 * r['forward_fp32_s']:.0f} ms | {1e3 * r['forward_bf16_s']:.0f} ms | "
                     f"{r['forward_speedup']:.2f}x | {1e3 * r['train_fp32_s']:.0f} ms | "
                     f"{1e3 * r['train_bf16_s']:.0f} ms | {r['train_speedup']:.2f}x | {r['max_abs_diff']:.1e} |")
    (out / "reduced_precision.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
