"""benchmarks/harness.py's keep_freed_memory: after it, memory a process frees stays mapped (no page faults to map
it again), which is what run.py --keep-freed-memory relies on. Each check runs in a fresh interpreter, since the
setting lasts for the process."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

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
