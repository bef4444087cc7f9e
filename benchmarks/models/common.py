"""What the per-method benchmarks (benchmarks/models/<method>.py) share: the backend with its ops timed, the
training step / inference callables, the synthetic episode, the peak-memory measurement (CPU: one fresh process
per side, the script re-run in its ``--memory CASE SIDE`` mode) and the report's header lines and files.

A method's script keeps what is its own: its cases, model build, episode keys, targets and report columns.
"""
import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from harness import MEMORY_CHILD_ENV, cuda_peak_extra_bytes, machine_info, peak_extra_bytes  # noqa: E402

SIDES = ("reference", "fused")


class TimedBackend(SimpleNamespace):
    """The backend with ``ops`` timed where the model calls them (seconds summed per op; synchronised on a GPU)
    while ``active`` (``op_shares`` turns it on for its one call): the timed samples run the ops as they are,
    since a GPU would idle at each synchronisation. Only ``name`` and the timed ops are exposed, so a model
    calling any other op fails loudly."""

    def __init__(self, backend, ops, sync):
        super().__init__(name=backend.name, seconds=dict.fromkeys(ops, 0.0), active=False)
        for op in ops:
            setattr(self, op, self._timed(op, getattr(backend, op), sync))

    def _timed(self, op, fn, sync):
        def call(*args, **kwargs):
            if not self.active:
                return fn(*args, **kwargs)
            sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            sync()
            self.seconds[op] += time.perf_counter() - start
            return out
        return call

    def reset(self):
        self.seconds.update(dict.fromkeys(self.seconds, 0.0))

    def shares(self, total):
        """The fraction of ``total`` seconds each op took since the last reset."""
        return {op: s / total for op, s in self.seconds.items()}


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


class ForwardBackwardTimedBackend(TimedBackend):
    """TimedBackend (forward seconds where the model calls an op) plus backward seconds: from the gradient reaching
    the op's output to its gradient leaving the features input (synchronised on a GPU)."""

    def __init__(self, backend, ops, sync):
        self.backward = dict.fromkeys(ops, 0.0)
        super().__init__(backend, ops, sync)
        self.sync = sync

    def also(self, name, fn):
        """``fn`` (features first, like the ops) timed as ``name`` beside them: a model part whose share of the
        call is reported with the ops' (its backward ends when the gradient leaves its first input)."""
        self.seconds[name] = self.backward[name] = 0.0
        return self._timed(name, fn, self.sync)

    def _timed(self, op, fn, sync):
        forward = super()._timed(op, fn, sync)

        def call(features, *args, **kwargs):
            if not (self.active and features.requires_grad and torch.is_grad_enabled()):
                return forward(features, *args, **kwargs)
            started = []

            def begin():
                sync()
                started.append(time.perf_counter())

            def end():
                sync()
                self.backward[op] += time.perf_counter() - started.pop()
            out = forward(_Stamp.apply(features, end), *args, **kwargs)
            return (_Stamp.apply(out[0], begin),) + tuple(out[1:]) if isinstance(out, tuple) else \
                _Stamp.apply(out, begin)
        return call

    def reset(self):
        super().reset()
        self.backward.update(dict.fromkeys(self.backward, 0.0))

    def shares(self, total):
        return {op: {"forward": self.seconds[op] / total, "backward": self.backward[op] / total}
                for op in self.seconds}


def op_shares(fn, timed, sync):
    """One instrumented call: the fraction of its wall time spent in each op of ``timed`` (a TimedBackend)."""
    timed.reset()
    timed.active = True
    sync()
    start = time.perf_counter()
    fn()
    sync()
    timed.active = False
    return timed.shares(time.perf_counter() - start)


def step_fn(model, batch, mode, amp="none", device=None, weight_decay=0.0):
    """One call of ``mode``: "train" is zero_grad + forward + backward + SGD step (momentum 0.9), "infer" an
    eval-mode forward without autograd; ``amp="bf16"`` runs the forward under bf16 autocast on ``device``."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else nullcontext()
    if mode == "infer":
        model.eval()

        def infer():
            with torch.no_grad(), autocast:
                return model(batch)["logits"]
        return infer
    model.train()
    # One optimizer per model: the memory child's measured call then finds the momentum buffers its warm-up made,
    # as a training run's steady state does and as the GPU's in-process peak (measured after the timed calls) sees.
    opt = getattr(model, "_bench_sgd", None)
    if opt is None:
        opt = model._bench_sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                                 momentum=0.9, weight_decay=weight_decay)

    def train():
        opt.zero_grad(set_to_none=True)
        with autocast:
            losses = model(batch)["losses"]
        sum(losses.values()).backward()
        opt.step()
    return train


def box_masks(batch, shots, size):
    """Support masks (batch, shots, size, size) holding a foreground box that covers 30 % of the image, so a fused
    op that skips background does so as on real masks."""
    lo, hi = int(size * 0.2), int(size * 0.2) + int(size * 0.3 ** 0.5)
    masks = torch.zeros(batch, shots, size, size, dtype=torch.long)
    masks[..., lo:hi, lo:hi] = 1
    return masks


def box_episode(batch, shots, size, device, **extra):
    """Random images, box_masks on the supports, the query's box shifted 10 px right; ``extra`` keys added."""
    g = torch.Generator().manual_seed(0)
    masks = box_masks(batch, shots, size)
    b = dict(query_img=torch.randn(batch, 3, size, size, generator=g),
             support_imgs=torch.randn(batch, shots, 3, size, size, generator=g), support_masks=masks,
             query_mask=masks[:, 0].roll(10, -1), **extra)
    return {k: v.to(device) for k, v in b.items()}


def peak_memory(fns, device, child_argv, sides=SIDES):
    """Peak extra memory of one call per side (bytes). GPU: the caching allocator's peak of ``fns``, in this
    process. CPU: resident memory, one fresh process per side running ``child_argv + [side]`` (the script and
    its flags, ending in ``--memory CASE``), whose last stdout line is print_peak_memory's."""
    if device.type == "cuda":
        return [cuda_peak_extra_bytes(fn) for fn in fns]
    out = []
    for side in sides:
        res = subprocess.run([sys.executable, *child_argv, side], check=True, capture_output=True, text=True,
                             env={**os.environ, **MEMORY_CHILD_ENV})
        out.append(json.loads(res.stdout.strip().splitlines()[-1])["peak_extra_bytes"])
    return out


def print_peak_memory(fn):
    """The child of peak_memory (CPU, after its warm-up call at a small size): the peak extra RSS of one call."""
    print(json.dumps({"peak_extra_bytes": peak_extra_bytes(fn)}))


def parser(doc):
    """The flags every method's script takes (its own are added by the caller)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", type=int, nargs="*", help="case indices to run (default: all)")
    p.add_argument("--tag", help="results as <method>-TAG.*, so a partial run keeps the full run's files")
    p.add_argument("--out", type=Path, default=HERE.parent / "results" / "models", help="results folder")
    p.add_argument("--memory", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    return p


def header(method, info, reps):
    """The report's machine and command lines."""
    memory = ("device memory (allocator)" if info.get("gpu") else
              "resident memory, one fresh process per side, glibc mmap threshold 64 KiB")
    return [f"Machine: {info['cpu']} ({info['logical_cpus']} logical CPUs, {info['torch_threads']} torch threads)"
            f"{', GPU ' + info['gpu'] if info.get('gpu') else ''}; torch {info['torch']}.",
            f"Command: `python benchmarks/models/{method}.py {' '.join(sys.argv[1:])}`; median of {reps} "
            "interleaved samples after a warm-up; memory = peak extra "
            f"{memory}."]


def paired_row(case, times, peaks, shares, reps):
    """A case measured on both sides: times (s), peaks (bytes) and op shares, each as (reference, fused)."""
    return dict(case, reference_s=times[0], fused_s=times[1], speedup=times[0] / times[1],
                reference_peak_extra_mb=peaks[0] / 2**20, fused_peak_extra_mb=peaks[1] / 2**20,
                memory_ratio=peaks[1] / peaks[0] if peaks[0] else None,
                reference_op_share=shares[0], fused_op_share=shares[1], reps=reps)


def paired_cells(row, digits=3):
    """The table cells both sides fill: seconds, speedup, MB, memory ratio."""
    return (f"{row['reference_s']:.{digits}f} | {row['fused_s']:.{digits}f} | {row['speedup']:.2f}x | "
            f"{row['reference_peak_extra_mb']:.0f} | {row['fused_peak_extra_mb']:.0f} | "
            f"{'-' if row['memory_ratio'] is None else format(row['memory_ratio'], '.2f')}")


def verdict(row, target):
    if row["memory_ratio"] is None:  # the reference peak was 0: nothing to compare the fused one with
        return "no memory ratio"
    return "met" if row["speedup"] >= target["speedup"] and row["memory_ratio"] <= target["memory_ratio"] else "missed"


def share_cell(row, op):
    """Reference / fused share of ``op``: forward + backward (ForwardBackwardTimedBackend), each as fwd/bwd."""
    def cell(share):
        return f"{share['forward']:.1%}/{share['backward']:.1%}" if isinstance(share, dict) else f"{share:.1%}"
    return f"{cell(row['reference_op_share'][op])} / {cell(row['fused_op_share'][op])}"


def run(method, args, cases, measure, report):
    """``measure(index, case, args)`` -> the row of every case (only those in ``args.only`` when it is given),
    each printed as JSON when done; then <method>{,-quick}{,-cuda}{,-TAG}.{json,md} in ``args.out``
    (benchmarks/results/models by default), the Markdown being ``report(rows, info, args)``, printed too. A case
    that raises (a CUDA out-of-memory, a shape the fused path refuses) is recorded under "failed" and the others
    still run: on a rare GPU session one failure must not lose the rest; the exit status is then 1."""
    info = machine_info(args.device)
    rows, failed = [], []
    for index, case in enumerate(cases):
        if args.only is not None and index not in args.only:
            continue
        try:
            rows.append(measure(index, case, args))  # the case's models are freed on return, before the next
        except Exception as e:
            traceback.print_exc()  # into the method's log: what to fix before the next lent GPU
            failed.append({"index": index, "error": f"{type(e).__name__}: {e}"})
            print(json.dumps(failed[-1]), flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            continue
        print(json.dumps(rows[-1]), flush=True)
    stem = method + ("-quick" if args.quick else "") + ("-cuda" if args.device.startswith("cuda") else "") + \
        (f"-{args.tag}" if args.tag else "")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "command": sys.argv[1:], "rows": rows,
                                                  "failed": failed}, indent=1))
    if rows:
        (out / f"{stem}.md").write_text(report(rows, info, args))
        print((out / f"{stem}.md").read_text())
    if failed:
        raise SystemExit(f"{method}: {len(failed)} case(s) failed: " +
                         "; ".join(f"case {f['index']}: {f['error']}" for f in failed))
