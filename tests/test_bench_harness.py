"""benchmarks/harness.py: keep_freed_memory (after it, memory a process frees stays mapped, no page faults to map
it again, which is what run.py --keep-freed-memory relies on; each check runs in a fresh interpreter, since the
setting lasts for the process) and median_times's untimed call after each settle."""
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from harness import median_times  # noqa: E402

# Allocate and touch 96 MB twice, freeing in between; report the minor page faults of the second round.
PROBE = """
import json, resource, sys
sys.path.insert(0, {bench!r})
from harness import keep_freed_memory
kept = keep_freed_memory() if {keep} else False
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def touch():
    buf = bytearray(96 << 20)   # zero-filled: every page written
    del buf
touch()
before = faults()
touch()
print(json.dumps({{"kept": kept, "second_round_faults": faults() - before}}))
"""


def probe(keep):
    code = PROBE.format(bench=str(ROOT / "benchmarks"), keep=keep)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc mallopt")
def test_keep_freed_memory_stops_the_page_faults_of_reused_memory():
    default, kept = probe(False), probe(True)
    pages = (96 << 20) // 4096
    assert default["second_round_faults"] > pages // 2   # glibc hands a 96 MB block back and faults it in again
    assert kept["kept"] is True
    assert kept["second_round_faults"] < pages // 20     # kept in the heap: reused without faulting


def test_median_times_does_not_time_the_first_call_after_a_settle():
    # a 1 ms op that pays 60 ms when called after a 50 ms pause, like the VM's first call after idling
    last = [0.0]

    def op():
        idle = time.perf_counter() - last[0]
        time.sleep(0.06 if idle > 0.05 else 0.001)
        last[0] = time.perf_counter()

    last[0] = time.perf_counter()
    (rewarmed,) = median_times([op], reps=3, settle=0.06)
    last[0] = time.perf_counter()
    (first_timed,) = median_times([op], reps=3, settle=0.06, rewarm_below=0.0)
    assert rewarmed < 0.002                     # the steady call
    assert first_timed > 0.003                  # 60 ms spread over the sample's 20 calls: about 4 ms


def test_median_times_does_not_rewarm_slow_calls():
    calls = [0]

    def slow():
        calls[0] += 1
        time.sleep(0.03)

    median_times([slow], reps=3, settle=0.0, rewarm_below=0.01)
    assert calls[0] == 2 + 3                    # two warm-ups (sized on the second), then one timed call per sample


def test_median_times_sizes_samples_on_the_second_call():
    """A slow first call (a GPU's kernel loads and cuBLAS set-up) used to size the samples: one call each."""
    calls = [0]

    def op():
        calls[0] += 1
        time.sleep(0.5 if calls[0] == 1 else 0.002)

    median_times([op], reps=1, settle=0.0, min_sample=0.2, rewarm_below=0.1)
    assert calls[0] > 10                        # the sample holds ~100 calls of 2 ms (10+ on a loaded machine), not 1


def test_median_times_sizes_samples_after_a_cold_first_call():
    # a GPU's first call loads its kernels (here 100 ms), every later one takes 1 ms: a sample sized on the
    # first call would time one call, at the timer's and the synchronisation's noise
    calls = [0]

    def op():
        calls[0] += 1
        time.sleep(0.1 if calls[0] == 1 else 0.001)

    median_times([op], reps=2, settle=0.0, rewarm_below=0.5)
    assert calls[0] >= 2 + 2 * (1 + 10)         # two warm-ups, then per sample a rewarm and >= 10 timed calls


def test_median_times_alternates_the_order_of_the_sides():
    """Round by round the sides run A B, B A, A B: on a machine whose speed drifts, a fixed order would time one
    side later every round."""
    order = []
    fns = [lambda: order.append("a"), lambda: order.append("b")]
    median_times(fns, reps=3, settle=0.0, min_sample=0.0, rewarm_below=0.0)  # one call per sample
    timed = order[4:]  # after two warm-up calls each
    assert timed == ["a", "b", "b", "a", "a", "b"], timed


def test_a_failing_model_case_does_not_lose_the_others(tmp_path):
    """benchmarks/models/common.run: a case that raises (a CUDA out-of-memory on a lent GPU) is recorded, the
    method's other cases still run and are written, and the exit status says so (it ended the process)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "models"))
    import common

    def measure(index, case, args):
        if index == 1:
            raise RuntimeError("CUDA out of memory")
        return {"case": case}
    args = common.parser("a method\n").parse_args(["--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"m: 1 case\(s\) failed: case 1: RuntimeError: CUDA out of memory"):
        common.run("m", args, ["a", "b", "c"], measure, lambda rows, info, args: f"{len(rows)} rows")
    saved = json.loads((tmp_path / "m.json").read_text())
    assert [r["case"] for r in saved["rows"]] == ["a", "c"] and saved["failed"][0]["index"] == 1
    assert (tmp_path / "m.md").read_text() == "2 rows"
