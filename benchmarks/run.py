"""Run every benchmark case: fsskern vs the pure-PyTorch reference, time and peak memory.

    python benchmarks/run.py            # full sizes (the papers'); minutes
    python benchmarks/run.py --quick    # CI smoke sizes; seconds

Writes benchmarks/results/<machine>/{results.json, report.md} (--quick: quick.json, quick.md).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cases import all_cases  # noqa: E402
from harness import machine_info, machine_slug, measure_memory_in_subprocess, median_times, peak_extra_bytes  # noqa: E402,E501


def memory_mode(index, side, quick):
    """Child process: warm the libraries up on the smallest case, then measure one call."""
    warm = all_cases(quick=True)[0]
    warm_inputs = warm.build()
    with torch.no_grad():
        warm.reference(warm_inputs), warm.fsskern(warm_inputs)
        case = all_cases(quick)[int(index)]
        inputs = case.build()
        fn = case.reference if side == "reference" else case.fsskern
        print(json.dumps({"peak_extra_bytes": peak_extra_bytes(lambda: fn(inputs))}))


def run_case(index, case, quick, reps):
    inputs = case.build()
    with torch.no_grad():
        peers = list(case.peers.items())
        times = median_times([lambda: case.reference(inputs), lambda: case.fsskern(inputs)] +
                             [lambda fn=fn: fn(inputs) for _, fn in peers], reps)
        t_ref, t_fss = times[:2]
    m_ref = measure_memory_in_subprocess(index, "reference", quick)
    m_fss = measure_memory_in_subprocess(index, "fsskern", quick)
    row = {
        "case": case.name, "op": case.op, "size": case.size, "reps": reps,
        "reference_ms": t_ref * 1e3, "fsskern_ms": t_fss * 1e3, "speedup": t_ref / t_fss,
        "reference_peak_extra_mb": m_ref / 2**20, "fsskern_peak_extra_mb": m_fss / 2**20,
        "memory_ratio": m_fss / m_ref if m_ref else None,
        "speedup_target": case.speedup_target, "memory_target": case.memory_target,
        "time_target_ms": case.time_target_ms,
        "peers": {name: {"ms": t * 1e3, "speedup_vs_peer": t / t_fss, "target": case.peer_targets.get(name)}
                  for (name, _), t in zip(peers, times[2:])},
    }
    print(f"{case.name:28s} {case.size:34s} ref {row['reference_ms']:9.2f} ms  fsskern {row['fsskern_ms']:9.2f} ms"
          f"  x{row['speedup']:7.1f}  mem {row['reference_peak_extra_mb']:8.1f} -> {row['fsskern_peak_extra_mb']:7.1f} MB",
          flush=True)
    return row


def verdict(value, target, higher_is_better):
    if target is None or value is None:
        return ""
    met = value >= target if higher_is_better else value <= target
    if met:
        return "met"
    return f"missed ({value / target:.2f}x of target)" if higher_is_better else f"missed ({value / target:.1f}x over)"


def markdown(rows, info, quick):
    lines = [f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} "
             f"({info['torch_threads']} threads, {info['cpu_capability']}), fsskern CPU dispatch "
             f"{info['fsskern_cpu_dispatch']}, gcc {info['compiler']}." + (" Quick sizes." if quick else ""),
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
        lines += ["", "| case | peer | peer time | fsskern time | fsskern speed-up over the peer |", "|---|---|---:|---:|---|"]
        for r, name, p in peer_rows:
            target = p.get("target")
            verdict_text = f" (>= {target:g}x: {verdict(p['speedup_vs_peer'], target, True)})" if target else ""
            lines.append(f"| {r['case']} ({r['size']}) | {name} | {p['ms']:.1f} ms | {r['fsskern_ms']:.1f} ms | "
                         f"**{p['speedup_vs_peer']:.2f}x**{verdict_text} |")
    lines.append("")
    lines.append("Median of the timed samples (interleaved, after a warm-up and a 0.1 s settle before each sample); peak extra memory of each side "
                 "measured once in its own process.")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CI smoke sizes")
    parser.add_argument("--only", default="", help="run only cases whose name contains this text")
    parser.add_argument("--reps", type=int, default=None, help="timed runs per side (default 5, quick 3)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/<machine>)")
    parser.add_argument("--memory", nargs=2, metavar=("CASE_INDEX", "SIDE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        return memory_mode(*args.memory, args.quick)

    info = machine_info()
    out = args.out or HERE / "results" / machine_slug(info)
    out.mkdir(parents=True, exist_ok=True)
    reps = args.reps or (3 if args.quick else 5)
    start = time.time()
    rows = [run_case(i, c, args.quick, reps) for i, c in enumerate(all_cases(args.quick))
            if args.only in f"{c.name} {c.size}"]
    stem = "quick" if args.quick else "results"
    (out / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    (out / f"{'quick' if args.quick else 'report'}.md").write_text(markdown(rows, info, args.quick))
    print(f"wrote {out}/ in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
