"""Run every benchmark: fsskern vs the pure-PyTorch reference and peers, time and peak memory,
the roofline of each case, the scaling sweeps and the thread scaling, with plots.

    python benchmarks/run.py            # full sizes (the papers'); about 9 minutes here
    python benchmarks/run.py --quick    # CI smoke sizes; about a minute
    python benchmarks/run.py --device cuda --no-sweeps   # the cases on a GPU (make gpu-check)

Writes benchmarks/results/<machine>/{results.json, report.md, plots/*.png}
(--quick: quick.json, quick.md, quick-plots/); <machine> is the GPU's name with --device cuda.
On a GPU the inputs live on it, every sample ends with a synchronize, peak extra memory is the
caching allocator's (in-process), CPU-only peers (faiss-cpu) are left out, and there is no
thread sweep.
"""
import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import all_cases  # noqa: E402
from harness import (copy_bandwidth_gbs, cuda_peak_extra_bytes, device_sync, gemm_gflops,  # noqa: E402
                     keep_freed_memory, machine_info, machine_slug, measure_memory_in_subprocess, median_times,
                     peak_extra_bytes)
from plots import plot_roofline, plot_sweep, plot_threads  # noqa: E402
from sweeps import all_sweeps, thread_cases  # noqa: E402


def memory_mode(index, side, quick):
    """Child process: warm the libraries up on the smallest case, and the measured side on its own inputs (what
    a first call at this size keeps, a library's cached plan or workspace, is no part of the calls a model makes
    after it, as the timings' warm-up calls leave it out), then measure one call."""
    warm = all_cases(quick=True)[0]
    warm_inputs = warm.build()
    with torch.no_grad():
        warm.reference(warm_inputs), warm.fsskern(warm_inputs)
        case = all_cases(quick)[int(index)]
        inputs = case.build()
        fn = case.reference if side == "reference" else case.fsskern
        fn(inputs)
        print(json.dumps({"peak_extra_bytes": peak_extra_bytes(lambda: fn(inputs))}))


def to_device(inputs, device):
    """A case's inputs (built on the CPU, seeded) moved to the device the run times on."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def time_sides(case, inputs, reps, device):
    """Median seconds of the reference, fsskern and each peer, interleaved, without autograd."""
    peers = list(case.peers.items())
    with torch.no_grad():
        times = median_times([lambda: case.reference(inputs), lambda: case.fsskern(inputs)] +
                             [lambda fn=fn: fn(inputs) for _, fn in peers], reps, sync=device_sync(device))
    return times[0], times[1], [(name, fn, t) for (name, fn), t in zip(peers, times[2:])]


def peak_memory(index, case, inputs, quick, device):
    """Peak extra memory of (reference, fsskern): resident memory, each side in a fresh process on
    the CPU; device memory, in this process, on a GPU."""
    if device.type == "cuda":
        with torch.no_grad():
            return (cuda_peak_extra_bytes(lambda: case.reference(inputs)),
                    cuda_peak_extra_bytes(lambda: case.fsskern(inputs)))
    return (measure_memory_in_subprocess(index, "reference", quick),
            measure_memory_in_subprocess(index, "fsskern", quick))


def run_case(index, case, quick, reps, device):
    inputs = to_device(case.build(), device)
    t_ref, t_fss, peers = time_sides(case, inputs, reps, device)
    m_ref, m_fss = peak_memory(index, case, inputs, quick, device)
    work = case.work(inputs) if case.work else None
    row = {
        "case": case.name, "op": case.op, "size": case.size, "reps": reps,
        "reference_ms": t_ref * 1e3, "fsskern_ms": t_fss * 1e3, "speedup": t_ref / t_fss,
        "reference_peak_extra_mb": m_ref / 2**20, "fsskern_peak_extra_mb": m_fss / 2**20,
        "memory_ratio": m_fss / m_ref if m_ref else None,
        "speedup_target": case.speedup_target, "memory_target": case.memory_target,
        "time_target_ms": case.time_target_ms,
        "peers": {name: {"ms": t * 1e3, "speedup_vs_peer": t / t_fss, "target": case.peer_targets.get(name),
                         "first_call_s": getattr(fn, "first_call_s", None)}
                  for name, fn, t in peers},
        "work": None if work is None else {"kind": work.kind, "amount": work.amount, "gemm": work.gemm},
    }
    print(f"{case.name:28s} {case.size:34s} ref {row['reference_ms']:9.2f} ms  fsskern {row['fsskern_ms']:9.2f} ms"
          f"  x{row['speedup']:7.1f}  mem {row['reference_peak_extra_mb']:8.1f} -> "
          f"{row['fsskern_peak_extra_mb']:7.1f} MB",
          flush=True)
    return row


def add_roofline(rows, copy_gbs, reps, device):
    """Achieved GFLOP/s or GB/s of each case next to this machine's limit for it."""
    limits = {}
    for r in rows:
        work = r.get("work")
        if not work:
            continue
        rate = work["amount"] / (r["fsskern_ms"] * 1e-3) / 1e9
        if work["kind"] == "flop":
            shape = tuple(work["gemm"])
            if shape not in limits:
                limits[shape] = gemm_gflops(*shape, reps=reps, device=device)
            limit, limit_name = limits[shape], f"torch.mm {shape[0]}x{shape[1]} @ {shape[1]}x{shape[2]}"
        else:
            limit, limit_name = copy_gbs, "copy bandwidth"
        r["roofline"] = {"kind": work["kind"], "achieved": rate, "limit": limit, "limit_name": limit_name,
                         "percent_of_limit": 100.0 * rate / limit}


def run_sweeps(quick, reps, device):
    results = []
    for sweep in all_sweeps(quick):
        points = []
        for value in sweep.values:
            case = sweep.case(value)
            t_ref, t_fss, peers = time_sides(case, to_device(case.build(), device), reps, device)
            points.append({"x": value, "size": case.size, "reference_ms": t_ref * 1e3, "fsskern_ms": t_fss * 1e3,
                           "peers_ms": {name: t * 1e3 for name, _, t in peers}})
            print(f"  sweep {sweep.name:32s} {str(value):>6s}  ref {t_ref * 1e3:9.2f} ms  "
                  f"fsskern {t_fss * 1e3:8.2f} ms  x{t_ref / t_fss:6.1f}", flush=True)
        results.append((sweep, points))
    return results


def run_threads(quick, reps):
    rows, threads = [], torch.get_num_threads()
    for case in thread_cases(quick):
        inputs = case.build()
        row = {"case": case.name, "size": case.size}
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                with torch.no_grad():
                    t_ref, t_fss = median_times([lambda: case.reference(inputs), lambda: case.fsskern(inputs)], reps)
                row[f"reference_{n}t_ms"], row[f"fsskern_{n}t_ms"] = t_ref * 1e3, t_fss * 1e3
        finally:
            torch.set_num_threads(threads)
        print(f"  threads {case.name:30s} fsskern 1t {row['fsskern_1t_ms']:8.2f} ms  2t {row['fsskern_2t_ms']:8.2f} ms",
              flush=True)
        rows.append(row)
    return rows


def verdict(value, target, higher_is_better):
    if target is None or value is None:
        return ""
    met = value >= target if higher_is_better else value <= target
    if met:
        return "met"
    return f"missed ({value / target:.2f}x of target)" if higher_is_better else f"missed ({value / target:.1f}x over)"


def markdown(rows, info, quick, sweeps=(), threads=(), plots_dir="plots", limits=None):
    if info.get("gpu"):
        where = (f"GPU: {info['gpu']} (compute capability {info['gpu_capability']}, {info['gpu_multiprocessors']} "
                 f"SMs, {info['gpu_memory_gib']:.0f} GiB, CUDA {info['cuda']}); every time and peak memory below "
                 "is on the GPU (CUDA caching allocator).")
    else:
        where = (f"CUDA kernels {'built' if info['fsskern_cuda_kernels'] else 'not built'} "
                 "(not run here: every time below is on the CPU).")
    lines = [f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} "
             f"({info['torch_threads']} threads, {info['cpu_capability']}), fsskern CPU dispatch "
             f"{info['fsskern_cpu_dispatch']}, gcc {info['compiler']} `{info['cxx_flags']}`. {where}"
             + (" Quick sizes." if quick else "")
             + (f" Certified max-cosine search (`search_dtype=torch.bfloat16`): {info['bf16_search']}; the bf16 "
                "autocast rows time the kernels on bf16 inputs, with the float32 kernel as their peer"
                + (f" (attention products: {info['bf16_attention']})" if info.get("bf16_attention") else "") + "."
                if info.get("bf16_search") else ""),
             "",
             "| case | size | reference | fsskern | speed-up (target) | peak extra memory ref -> fsskern | "
             "memory ratio (target) |",
             "|---|---|---:|---:|---|---|---|"]
    for r in rows:
        speed = f"**{r['speedup']:.1f}x**"
        if r["speedup_target"]:
            speed += f" (>= {r['speedup_target']:g}x: {verdict(r['speedup'], r['speedup_target'], True)})"
        if r.get("time_target_ms"):
            speed += f" (fsskern <= {r['time_target_ms']:g} ms: {verdict(r['time_target_ms'], r['fsskern_ms'], True)})"
        ratio = "n/a" if r["memory_ratio"] is None else f"{r['memory_ratio']:.3f}"
        if r["memory_target"] and r["memory_ratio"] is not None:
            ratio += f" (<= {r['memory_target']:g}: {verdict(r['memory_ratio'], r['memory_target'], False)})"
        lines.append(f"| {r['case']} | {r['size']} | {r['reference_ms']:.1f} ms | {r['fsskern_ms']:.1f} ms | {speed} | "
                     f"{r['reference_peak_extra_mb']:.1f} -> {r['fsskern_peak_extra_mb']:.1f} MB | {ratio} |")
    peer_rows = [(r, name, p) for r in rows for name, p in r.get("peers", {}).items()]
    if peer_rows:
        lines += ["", "| case | peer | peer time | fsskern time | fsskern speed-up over the peer |",
                  "|---|---|---:|---:|---|"]
        for r, name, p in peer_rows:
            target = p.get("target")
            verdict_text = f" (>= {target:g}x: {verdict(p['speedup_vs_peer'], target, True)})" if target else ""
            if p.get("first_call_s") is not None:
                verdict_text += f"; one-time compile {p['first_call_s'] - p['ms'] * 1e-3:.1f} s, not in the time"
            lines.append(f"| {r['case']} ({r['size']}) | {name} | {p['ms']:.1f} ms | {r['fsskern_ms']:.1f} ms | "
                         f"**{p['speedup_vs_peer']:.2f}x**{verdict_text} |")
    lines.append("")
    kept = ", the timing process keeping the memory it frees (glibc mallopt)" if info.get("freed_memory_kept") else ""
    memory = ("the caching allocator's peak of one call, in this process" if info.get("gpu") else
              "the resident memory of one call after a warm-up call, in a fresh process per side with glibc's mmap "
              "threshold fixed at 64 KiB (freed blocks go back to the system, so the peaks repeat)")
    lines.append("Median of the timed samples (interleaved, after a warm-up; before each sample a 0.1 s settle "
                 f"and, for calls under 0.5 s, one untimed call{kept}); peak extra memory of each side: {memory}.")
    roof = [r for r in rows if r.get("roofline")]
    if roof:
        lines += ["", "### Roofline", ""]
        if limits:
            lines.append(f"Machine limits measured in this run: GEMM {limits['gemm_peak_gflops']:.0f} GFLOP/s "
                         f"(torch.mm 2048^3, fp32, {limits.get('device', 'cpu')}), copy {limits['copy_gbs']:.1f} GB/s "
                         "(read + write). "
                         "Each flop-bound case is compared with torch.mm at its own GEMM shape (skinny GEMMs run "
                         "below the peak); fsskern's flops count only the work it does (foreground pixels, "
                         "valid keys).")
            lines.append("")
        lines += ["| case | size | fsskern achieves | limit | % of limit |", "|---|---|---:|---|---:|"]
        for r in roof:
            f = r["roofline"]
            unit = "GFLOP/s" if f["kind"] == "flop" else "GB/s"
            lines.append(f"| {r['case']} | {r['size']} | {f['achieved']:.1f} {unit} | {f['limit']:.1f} {unit} "
                         f"({f['limit_name']}) | {f['percent_of_limit']:.0f}% |")
        lines += ["", f"![roofline]({plots_dir}/roofline.png)"]
    if sweeps:
        lines += ["", "### Scaling sweeps", ""]
        for sweep, points in sweeps:
            peer_names = list(points[0]["peers_ms"])
            lines += [f"**{sweep.title}**", "", f"![{sweep.name}]({plots_dir}/{sweep.name}.png)", "",
                      f"| {sweep.xlabel} | reference | fsskern | speed-up |" + "".join(f" {n} |" for n in peer_names),
                      "|---:|---:|---:|---:|" + "---:|" * len(peer_names)]
            for p in points:
                lines.append(f"| {p['x']} | {p['reference_ms']:.2f} ms | {p['fsskern_ms']:.2f} ms | "
                             f"{p['reference_ms'] / p['fsskern_ms']:.1f}x |" +
                             "".join(f" {p['peers_ms'][n]:.2f} ms |" for n in peer_names))
            lines.append("")
    if threads:
        lines += ["### Threads: 1 vs 2", "", f"![threads]({plots_dir}/threads.png)", "",
                  "| case | size | reference 1 / 2 threads | fsskern 1 / 2 threads | fsskern scaling |",
                  "|---|---|---|---|---:|"]
        for t in threads:
            lines.append(f"| {t['case']} | {t['size']} | {t['reference_1t_ms']:.1f} / {t['reference_2t_ms']:.1f} ms | "
                         f"{t['fsskern_1t_ms']:.1f} / {t['fsskern_2t_ms']:.1f} ms | "
                         f"{t['fsskern_1t_ms'] / t['fsskern_2t_ms']:.2f}x |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI smoke sizes")
    parser.add_argument("--only", default="", help="run only cases whose name contains this text")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per side (default 5, quick 3)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/<machine>)")
    parser.add_argument("--no-sweeps", action="store_true", help="main cases and roofline only")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the inputs live and every side runs (cuda: the current GPU)")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="time with glibc keeping the memory it frees, as a caching allocator does: the "
                             "references no longer page-fault their temporaries back in at every call")
    parser.add_argument("--memory", nargs=2, metavar=("CASE_INDEX", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        return memory_mode(*args.memory, args.quick)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    # timing only: the memory children run with harness.MEMORY_CHILD_ENV either way
    info = {**machine_info(device), "freed_memory_kept": args.keep_freed_memory and keep_freed_memory()}
    out = args.out or HERE / "results" / machine_slug(info)
    out.mkdir(parents=True, exist_ok=True)
    reps = args.reps or (3 if args.quick else 5)
    start = time.time()
    stem = "quick" if args.quick else "results"

    errors = []

    def save(rows, limits=None, threads=(), sweeps=()):
        (out / f"{stem}.json").write_text(json.dumps(
            {"machine": info, "limits": limits, "rows": rows, "threads": list(threads), "seconds": time.time() - start,
             "sweeps": [{"name": s.name, "title": s.title, "xlabel": s.xlabel, "points": p} for s, p in sweeps],
             **({"errors": errors} if errors else {}), **({} if limits else {"partial": True})}, indent=2))

    rows = []
    for i, c in enumerate(all_cases(args.quick, device)):
        if args.only in f"{c.name} {c.size}":
            try:
                rows.append(run_case(i, c, args.quick, reps, device))
            except Exception as e:  # noqa: BLE001  (one broken case must not hide the others; named, then exit 1)
                traceback.print_exc()
                errors.append({"case": c.name, "size": c.size, "error": f"{type(e).__name__}: {e}"})
            save(rows)  # each case on disk as it finishes: a run stopped at a time limit keeps what it measured
    limits = {"gemm_peak_gflops": gemm_gflops(2048, 2048, 2048, reps=3, device=device),
              "copy_gbs": copy_bandwidth_gbs(device=device), "device": device.type}
    add_roofline(rows, limits["copy_gbs"], reps=3, device=device)
    sweep_reps = 2 if args.quick else 3
    sweeps = [] if args.no_sweeps or args.only else run_sweeps(args.quick, sweep_reps, device)
    # CPU threads do not change a GPU's times
    threads = [] if args.no_sweeps or args.only or device.type == "cuda" else run_threads(args.quick, sweep_reps)

    plots_name = "quick-plots" if args.quick else "plots"
    plots = out / plots_name
    plots.mkdir(exist_ok=True)
    plot_roofline(rows, plots / "roofline.png")
    for sweep, points in sweeps:
        plot_sweep(sweep, points, plots / f"{sweep.name}.png")
    if threads:
        plot_threads(threads, plots / "threads.png")
    save(rows, limits, threads, sweeps)
    (out / f"{'quick' if args.quick else 'report'}.md").write_text(
        markdown(rows, info, args.quick, sweeps, threads, plots_name, limits))
    print(f"wrote {out}/ in {time.time() - start:.0f} s")
    if errors:
        sys.exit(f"{len(errors)} case(s) failed: "
                 + "; ".join(f"{e['case']} {e['size']}: {e['error']}" for e in errors))


if __name__ == "__main__":
    main()
