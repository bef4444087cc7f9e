"""Timing and memory measurement shared by every benchmark case.

Time: both sides run alternately (reference, fsskern, reference, ...) after a warm-up, so drift
of the machine hits both; the median of the timed samples is reported.
Allocator: by default glibc's, as a CPU training loop has it: a reference that frees large temporaries hands them
back to the OS and maps them again at its next call (its page faults are part of its time). ``keep_freed_memory``
(run.py ``--keep-freed-memory``) times instead as under a caching allocator (PyTorch's on CUDA, jemalloc, tcmalloc).
Memory: each side runs once in a fresh process; the peak resident set size during the call
(Linux VmHWM, reset just before the call) minus the resident size just before it is the side's
peak extra memory. Inputs are built before the reset, so they are not counted. The fresh process runs with
``MEMORY_CHILD_ENV`` (glibc's mmap threshold fixed), so the peak follows live memory, not heap fragmentation.
"""
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def keep_freed_memory():
    """Tell glibc malloc to keep freed memory in the process (no trimming of the heap top, no mmap for large
    blocks), so timed calls neither map fresh pages nor pay for the pages another call released.

    What it changes (session 23, AMD EPYC, prototype attention B4 H8 N3600 D32 P70): the reference maps and unmaps
    ~60 MB a call (15,700 minor faults) and runs in 24-26 ms instead of 48; the bf16 kernel measured right after it
    takes 7.0 ms instead of a median 11.3 ms (it does not fault itself: the side after the reference is slowed), so its
    ratio over the float32 kernel no longer depends on the order of the sides.
    A no-op where the C library has no ``mallopt`` (not glibc); returns whether it applied.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    return bool(mallopt(m_trim_threshold, 2**31 - 1)) and bool(mallopt(m_mmap_max, 0))


def median_times(fns, reps, settle=0.1, min_sample=0.02, rewarm_below=0.5, sync=lambda: None):
    """Median wall time (seconds) per call of each function, runs interleaved, in turns of alternating order.

    Before each timed sample the machine settles (garbage collected, `settle` seconds idle), so
    one side does not pay for the memory the other just released; a sample times enough calls
    back to back to last `min_sample` seconds, so fast ops are not measured at timer noise.
    Functions whose call takes less than `rewarm_below` seconds make one untimed call after the
    settle: on the shared virtual machines this project runs on, the first call after an idle
    pause pays for touching its memory again (an Intel Xeon VM, one thread busy the whole pause:
    +8 to +35 ms for a 12 ms op after 0.02 to 0.3 s, no page fault the guest sees), which back-to-
    back calls in a model never do, and which swamped ops of a few milliseconds.
    `sync` waits for queued work (torch.cuda.synchronize on a GPU, whose launches return at
    once); it is called before the clock starts and before it stops, not between calls.
    """
    def once(fn):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    calls, rewarm = [], []
    for fn in fns:  # warm-up, and how many calls make one sample
        once(fn)  # sized on a second call: a GPU's first loads kernels and sets up cuBLAS (10-100x), most of all
        elapsed = once(fn)  # for the slow calls
        calls.append(max(1, math.ceil(min_sample / max(elapsed, 1e-9))))
        rewarm.append(elapsed < rewarm_below)
    samples = [[] for _ in fns]
    sides = list(zip(fns, calls, rewarm, samples))
    for r in range(reps):
        # the order turns every round: on a VM whose speed drifts within seconds (an Intel Xeon, one 473 UMTFSS
        # step: 19 to 33 s over six calls), a fixed order would always time the same side later
        for fn, n, warm, out in (sides if r % 2 == 0 else sides[::-1]):
            gc.collect()
            time.sleep(settle)
            if warm:
                fn()
            sync()
            start = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            out.append((time.perf_counter() - start) / n)
    return [statistics.median(s) for s in samples]


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


# The CPU memory children run with glibc's mmap threshold fixed at 64 KiB. By default the threshold rises to
# the largest block freed so far (up to 32 MiB), so later blocks come from the heap and freed ones stay
# resident in it: the peak then depends on fragmentation history (one CRCNet inference at 473 measured 282 to
# 385 MB in three fresh processes). With a fixed threshold every large block is mapped and unmapped at free,
# and the peak follows the live tensors: repeated runs agree within 1 MB. Other C libraries ignore the variable.
MEMORY_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}


def peak_extra_bytes(fn):
    """Peak resident memory added while fn runs (bytes), measured in this process."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - before) * 1024


def cuda_peak_extra_bytes(fn):
    """Peak GPU memory that fn's allocations add (bytes), from the caching allocator's counters:
    on a GPU the device memory is what a fused op saves, and the counters are exact in-process."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - before)


def measure_memory_in_subprocess(case_index, side, quick):
    """Run `run.py --memory CASE_INDEX SIDE` in a fresh interpreter; its peak extra bytes."""
    cmd = [sys.executable, str(HERE / "run.py"), "--memory", str(case_index), side] + (["--quick"] if quick else [])
    env = {**os.environ, **MEMORY_CHILD_ENV, "PYTHONPATH": str(HERE)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def machine_info(device="cpu"):
    """The machine header of a report; on a CUDA device also the GPU's name, capability and CUDA."""
    import fsskern
    from fsskern.engine.logging import git_commit
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = fsskern.build_info()
    return {
        "commit": git_commit(),
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fsskern_cuda_kernels": info["cuda"],
        "fsskern_cpu_dispatch": ",".join(info["cpu_dispatch"]),
        "compiler": info["compiler"],
        "cxx_flags": info["cxx_flags"],
        "bf16_search": info["bf16_search"],
        "bf16_attention": info["bf16_attention"],
        "python": platform.python_version(),
        **(cuda_info() if torch.device(device).type == "cuda" else {}),
    }


def cuda_info():
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"gpu": props.name, "gpu_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": props.total_memory / 2**30, "gpu_multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda}


def machine_slug(info):
    if info.get("gpu"):
        return _slug(info["gpu"])
    return f"{_slug(info['cpu'])}-{info['logical_cpus']}cpu"


def _slug(name):
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return slug


def device_sync(device):
    """What median_times must call on `device` to time finished work."""
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


def gemm_gflops(m, k, n, reps=3, device="cpu"):
    """fp32 GFLOP/s of torch.mm (m x k) @ (k x n) on `device`: the flop limit of a GEMM-shaped case."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    (t,) = median_times([lambda: torch.mm(a, b)], reps, settle=0.02, sync=device_sync(device))
    return 2.0 * m * k * n / t / 1e9


def copy_bandwidth_gbs(mbytes=256, reps=5, device="cpu"):
    """Memory bandwidth of a large tensor copy on `device` (bytes read + written per second, in GB/s)."""
    src = torch.randn(mbytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    (t,) = median_times([lambda: dst.copy_(src)], reps, settle=0.02, sync=device_sync(device))
    return 2.0 * src.numel() * 4 / t / 1e9
