"""One prepared run on a machine with an NVIDIA GPU: build fsskern for that GPU, run the CUDA
tests, the op benchmarks on CUDA and one training step and one inference of every registered
model, and leave every result in one folder. See docs/gpu.md.

    make gpu-check                          # python3 python/gpu_check.py
    make gpu-check ARGS=--dry-run           # what it would do; any machine, no GPU needed
    make gpu-check ARGS="--skip build --limit op-bench=200"

Phases, in order, each under its own time limit (--limit PHASE=SECONDS); a phase that fails or
runs out of time is recorded and the next one runs, so one broken kernel does not cost the run:

    build        venv, then fsskern built with its CUDA kernels for this GPU's architecture only
    cuda-tests   pytest -k "cuda and not simt": every CUDA test (JUnit XML + log)
    op-bench     benchmarks/run.py --device cuda at the papers' sizes (JSON + Markdown)
    model-steps  each registered model: one inference and one training step, ops=fused vs reference
    method-bench the method benchmarks (benchmarks/models/) at the papers' sizes, on the cases
                 that issues 13-16 set targets for: one process per method, each under its own cap
    summary      timings.json and summary.md; the short summary is printed last

Everything lands in $GPU_CHECK_OUT (default runs/gpu-check); --pack FILE.tgz packs that folder after every
phase, so a run stopped from outside still leaves what finished. --deadline-s S fits the phases into S
seconds from the start (each phase's limit shrinks to what is left, keeping time for the summary, and the
last phase, unless --limit names it, grows to what the earlier ones left unused). Exit
status: 0 when every phase passed, 1 when one failed or timed out, 2 when there is no GPU (nothing is run).

This process needs no torch: it runs under the machine's python3 and starts every phase as a
child process, which it kills (with its whole process group) at the phase's limit.
"""
import argparse
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["build", "cuda-tests", "op-bench", "model-steps", "method-bench", "summary"]
# Seconds per phase: 550 in all, so one device call of 10 minutes holds the check with the GPU
# probe and the summary.
LIMITS = {"build": 150, "cuda-tests": 100, "op-bench": 80, "model-steps": 70, "method-bench": 150}
# The method benchmarks' cases that the open method issues set targets for (ResNet-50, 473 x 473,
# batch 2 unless named), and each process's share of the phase's time: method, flags, share. Each
# prints a row as it finishes a case, so a process stopped at its cap still leaves what it measured.
METHOD_BENCH = [
    ("rilfs", ["--only", "0", "1", "4", "5"], 0.22),   # 1-shot train + inference, fp32 and amp=bf16 (issue 13)
    ("dpcl", ["--only", "0", "2"], 0.22),              # train step 1- and 5-shot; the 5-shot reference: ~28 GB (14)
    ("umtfss", ["--only", "0", "1", "4", "5"], 0.32),  # train step 1- and 5-shot, the prototype step alone (15)
    ("crcnet", ["--sizes", "321", "473"], 0.24),       # train step and 10-step inference at 321 and 473 (16)
]
METHOD_REPS = 3
# model-steps: fused and reference logits may differ by accumulation order, which cuDNN's TF32 convolutions
# downstream of an op amplify; a wrong kernel is off by the logits' own size. Fails above this share of max |ref|.
LOGIT_TOLERANCE = 1e-2
# model-steps: the models with fused kernels of their own first, so a phase cut short keeps them; the rest follow
MODEL_ORDER = ["popnet", "rilfs", "umtfss", "dpcl", "crcnet"]
CUDA_LOST_EXIT = 3  # the model-steps child's exit when a CUDA error broke its context: a new process goes on
RESERVE_S = 20      # --deadline-s: seconds kept for the summary and the last pack
NO_GPU_EXIT = 2

# Run by the base interpreter: what torch (if any) sees, and where its packages live.
PROBE = """
import json, site, sys
info = {"python": sys.executable, "in_venv": sys.prefix != sys.base_prefix, "site": site.getsitepackages()}
try:
    import torch
except ImportError:
    info["torch"] = None
else:
    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["capability"] = "%d.%d" % torch.cuda.get_device_capability(0)
print(json.dumps(info))
"""


# ---- finding the GPU ------------------------------------------------------------------------------

def probe_python(python: str) -> dict:
    """What `python` offers: its torch, the GPU that torch sees, its site-packages."""
    try:
        out = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError, IndexError):
        return {"python": python, "torch": None}


def probe_nvidia_smi() -> Optional[dict]:
    """The first GPU nvidia-smi lists (name, compute capability, driver), or None."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [line.split(",") for line in out.stdout.strip().splitlines() if line.count(",") == 2]
    if out.returncode != 0 or not rows:
        return None
    name, capability, driver = (part.strip() for part in rows[0])
    return {"gpu": name, "capability": capability, "driver": driver}


def find_gpu(base: dict, fake: Optional[str]) -> Optional[dict]:
    """{"gpu", "capability", "driver"?, "source"} of the GPU to check, or None when there is none."""
    if fake:  # tests of the phase logic on machines without a GPU
        name, capability = fake.rsplit(",", 1)
        return {"gpu": name, "capability": capability, "source": "--fake-gpu"}
    smi = probe_nvidia_smi()
    if base.get("gpu"):
        return {"gpu": base["gpu"], "capability": base["capability"], "driver": (smi or {}).get("driver"),
                "source": f"torch {base['torch']} in {base['python']}"}
    if smi:
        return {**smi, "source": "nvidia-smi"}
    return None


def no_gpu_message(base: dict) -> str:
    torch_note = (f"torch {base['torch']} in {base['python']} sees no CUDA device" if base.get("torch")
                  else f"{base['python']} has no torch")
    return f"gpu-check: NO GPU on this machine ({torch_note}, and nvidia-smi lists none)"


# ---- phases ---------------------------------------------------------------------------------------

@dataclass
class Step:
    title: str
    argv: Optional[List[str]] = None  # a command run in the repository root ...
    # ... or a function of this script: (phase log, seconds left) -> exit status, None when it ran out of time
    action: Optional[Callable[[IO, float], Optional[int]]] = None
    env: Dict[str, str] = field(default_factory=dict)


@dataclass
class Phase:
    name: str
    limit_s: float
    log: Path
    steps: List[Step]
    outputs: List[Path] = field(default_factory=list)


def venv_steps(args, base: dict) -> List[Step]:
    """Create the venv unless it exists. With a CUDA torch in the base interpreter (the device
    machines: no registry reachable) the venv sees the base's packages; else the Makefile's way."""
    python = args.venv / "bin" / "python"
    if python.exists():
        return []
    if base.get("torch_cuda"):
        steps = [Step(f"{args.python} -m venv --system-site-packages --without-pip {args.venv}",
                      [args.python, "-m", "venv", "--system-site-packages", "--without-pip", str(args.venv)])]
        if base.get("in_venv"):  # --system-site-packages reaches the base's base, not the base venv's own
            steps.append(Step(f"{args.venv}/.../gpu_check_base.pth -> {', '.join(base['site'])}",
                              action=lambda log, left: link_base_site(python, base["site"])))
        return steps
    return [Step(f"make venv VENV={args.venv}", ["make", "venv", f"VENV={args.venv}", f"PYTHON={args.python}"])]


def link_base_site(python: Path, site_dirs: List[str]):
    """A .pth in the venv that adds the base venv's site-packages, their own .pth files processed
    (addsitedir), after the venv's own packages."""
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "gpu_check_base.pth").write_text("".join(f"import site; site.addsitedir({d!r})\n"
                                                              for d in site_dirs))
    return 0


def build_phase(args, base: dict, gpu: Optional[dict], limit: float) -> Phase:
    python = str(args.venv / "bin" / "python")
    arch = gpu["capability"] if gpu else "<the GPU's compute capability>"
    env = {"FSSKERN_CUDA": "1", "TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": str(os.cpu_count() or 1),
           # ninja and the toolchain of the base interpreter (torch compiles one file at a time without ninja)
           "PATH": os.pathsep.join([str(Path(args.python).parent), os.environ.get("PATH", "")])}
    check = ("import fsskern; info = fsskern.build_info(); print(info); "
             "assert info['cuda'], 'fsskern was built without its CUDA kernels'; import torch; "
             "assert torch.cuda.is_available(), 'torch sees no GPU: every CUDA test would be skipped'")
    steps = venv_steps(args, base) + [
        # the Makefile's build recipe, for this GPU only; -v: a build stopped at the limit names its last file
        Step("pip install -v --no-build-isolation --no-deps -e .  (the build)",
             [python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", "-e", "."], env=env),
        Step("fsskern.build_info() lists the CUDA kernels", [python, "-c", check]),
    ]
    return Phase("build", limit, args.out / "build.log", steps)


def test_phase(args, base: dict, gpu: Optional[dict], limit: float) -> Phase:
    xml = args.out / "cuda-tests.xml"
    # -k matches markers and names: tests marked `cuda`, all of test_cuda.py, test_build's
    # test_cuda_*; not the emulator's suite (test_simt, CPU only). A test module that cannot be
    # imported there (a missing package) must not stop the others. The JUnit XML is written only at
    # the end, so -v names each test as it starts and its outcome as it ends (a phase stopped at its limit
    # is counted from the log, whose last line names the test that hung) and faulthandler prints the stack
    # of one that runs past a minute. CUDA_LAUNCH_BLOCKING: an illegal access is reported by the test whose
    # kernel made it.
    argv = [str(args.venv / "bin" / "python"), "-m", "pytest", "-v", "-rfEs", "-o", "faulthandler_timeout=60",
            "-p", "no:cacheprovider", "tests",
            "-k", "cuda and not simt", "--continue-on-collection-errors", f"--junitxml={xml}"]
    return Phase("cuda-tests", limit, args.out / "cuda-tests.log",
                 [Step(shlex.join(argv), argv, env={"CUDA_LAUNCH_BLOCKING": "1"})], [xml])


def bench_phase(args, base: dict, gpu: Optional[dict], limit: float) -> Phase:
    out = args.out / "bench"
    argv = [str(args.venv / "bin" / "python"), "benchmarks/run.py", "--device", "cuda", "--no-sweeps",
            "--out", str(out)]
    return Phase("op-bench", limit, args.out / "op-bench.log", [Step(shlex.join(argv), argv)],
                 [out / "results.json", out / "report.md"])


def model_phase(args, base: dict, gpu: Optional[dict], limit: float) -> Phase:
    result = args.out / "model-steps.json"
    argv = [str(args.venv / "bin" / "python"), str(Path(__file__).resolve()), "--run-model-steps", str(result),
            "--model-size", str(args.model_size), "--model-batch", str(args.model_batch)]
    return Phase("model-steps", limit, args.out / "model-steps.log",
                 [Step(shlex.join(argv), action=lambda log, left: watch_model_steps(argv, result, left, log))],
                 [result])


def method_phase(args, base: dict, gpu: Optional[dict], limit: float) -> Phase:
    result = args.out / "method-bench" / "method-bench.json"
    argv = [str(args.venv / "bin" / "python"), str(Path(__file__).resolve()), "--run-method-bench",
            str(result.parent), "--method-limit", str(limit)]
    return Phase("method-bench", limit, args.out / "method-bench.log", [Step(shlex.join(argv), argv)], [result])


BUILDERS = {"build": build_phase, "cuda-tests": test_phase, "op-bench": bench_phase, "model-steps": model_phase,
            "method-bench": method_phase}


def make_phase(name: str, args, base: dict, gpu: Optional[dict], limit: float) -> Phase:
    phase = BUILDERS[name](args, base, gpu, limit)
    if name in args.fake_phase:  # tests: a phase replaced by a shell command
        phase.steps = [Step(args.fake_phase[name], ["bash", "-c", args.fake_phase[name]])]
    return phase


def plan(args, base: dict, gpu: Optional[dict]) -> List[Phase]:
    return [make_phase(name, args, base, gpu, args.limits[name]) for name in BUILDERS if name not in args.skip]


class Terminated(BaseException):
    """SIGTERM reached this process (the device tool's limit, `timeout`, a parent's phase limit). A
    BaseException, so that no step's ``except Exception`` records it as a failure and goes on."""


def on_sigterm(signum, frame):
    raise Terminated()


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """End proc's process group (its own session: pip's nvcc, pytest's workers, a benchmark): SIGTERM first,
    so that a gpu_check child stops its own children's sessions in turn (they are outside this group), then
    SIGKILL for whatever of the group is left after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # nothing of the group is left
            break
        if sig == signal.SIGTERM:
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def start_command(argv: List[str], env: Dict[str, str], log) -> subprocess.Popen:
    """argv started in the repository root, in a session of its own (stop_group ends it with its children)."""
    return subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env}, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def run_command(argv: List[str], env: Dict[str, str], timeout: float, log) -> Optional[int]:
    """Exit status of argv, or None when it ran past `timeout` and was stopped with its children."""
    proc = start_command(argv, env, log)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        return None
    except BaseException:  # Terminated, KeyboardInterrupt: no child may outlive this run on the GPU
        stop_group(proc, grace=2.0)
        raise


def run_phase(phase: Phase) -> dict:
    """Run the phase's steps in order until one fails or the phase's time is up."""
    start = time.monotonic()
    record = {"phase": phase.name, "status": "ok", "limit_s": phase.limit_s, "log": str(phase.log), "steps": []}
    print(f"== {phase.name} (limit {phase.limit_s:.0f} s, log {phase.log})", flush=True)
    for output in phase.outputs:  # a rerun into the same folder must not report an earlier run's files as its own
        output.unlink(missing_ok=True)
    with open(phase.log, "w") as log:
        for step in phase.steps:
            left = phase.limit_s - (time.monotonic() - start)
            log.write(f"$ {step.title}\n")
            log.flush()
            step_start = time.monotonic()
            if left <= 0:
                rc = None
            elif step.action:
                try:
                    rc = step.action(log, left)
                except Exception:  # noqa: BLE001  (a failed step is recorded, the next phase runs)
                    log.write(traceback.format_exc())
                    rc = 1
            else:
                rc = run_command(step.argv, step.env, left, log)
            seconds = time.monotonic() - step_start
            record["steps"].append({"step": step.title, "rc": rc, "seconds": round(seconds, 2)})
            print(f"   {step.title[:100]}: {'timed out' if rc is None else f'rc {rc}'} in {seconds:.1f} s", flush=True)
            if rc is None:
                record["status"] = "timeout"
                log.write(f"\n[gpu-check] killed at the phase limit of {phase.limit_s:.0f} s\n")
                break
            if rc != 0:
                record["status"] = "failed"
                break
    record["seconds"] = round(time.monotonic() - start, 2)
    if record["status"] != "ok":
        print(f"   {phase.name} {record['status'].upper()}; the log ends:", flush=True)
        print("".join("     | " + line for line in tail(phase.log, 15)), flush=True)
    return record


def watch_model_steps(argv: List[str], result: Path, seconds: float, log, poll: float = 0.5) -> Optional[int]:
    """The model-steps child under watch, ``seconds`` in all: a model running past its share of the time left
    (model_cap) is stopped and recorded as a timeout, and a fresh child (``--continue``) takes the models after
    it; so does one after a CUDA error, which leaves a process's CUDA context unusable (the child exits
    CUDA_LOST_EXIT), or after a crash. 0 when every model passed, 1 when one did not, None when the phase's time
    ran out first; a child that ends without getting one model further ends the phase with its status."""
    deadline = time.time() + seconds
    extra: List[str] = []
    while True:
        before = finished_models(read_json(result) or {})
        proc, stopped = start_command(argv + extra, {}, log), False
        try:
            while proc.poll() is None:
                time.sleep(poll)
                state = read_json(result) or {}
                running = running_model(state)
                now = time.time()
                if now >= deadline or running and now - state["models"][running]["started"] > model_cap(
                        state, running, deadline):
                    stop_group(proc)
                    stopped = True
        except BaseException:  # Terminated: no child may outlive this run on the GPU
            stop_group(proc, grace=2.0)
            raise
        rc, state = proc.returncode, read_json(result) or {}
        running = running_model(state)
        if running:  # stopped at its cap or the deadline, or its process died under it
            started = state["models"][running]["started"]
            why = (f"stopped after {time.time() - started:.0f} s, its share of the phase's time" if stopped
                   else f"its process exited with status {rc}")
            state["models"][running] = {"status": "timeout" if stopped else "failed", "error": why}
            write_json(result, state)
            log.write(f"\n[gpu-check] model {running}: {why}\n")
            log.flush()
        done = finished_models(state)
        if state.get("order") is not None and set(state["order"]) <= done:
            return int(any(m["status"] != "ok" for m in state["models"].values()))
        if time.time() >= deadline:
            return None
        if not stopped and done == before:  # no model further: a new child would end the same way
            return rc or 1
        extra = ["--continue"]


def finished_models(state: dict) -> set:
    return {n for n, m in state.get("models", {}).items() if m.get("status") != "running"}


def write_json(path: Path, value: dict) -> None:
    """``value`` at ``path``, replaced whole: the watcher and a stop mid-write never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    os.replace(tmp, path)


def running_model(state: dict) -> Optional[str]:
    return next((n for n, m in state.get("models", {}).items() if m.get("status") == "running"), None)


def model_cap(state: dict, running: str, deadline: float) -> float:
    """The seconds model ``running`` may take: the phase's time left when it started over the models not yet
    done then (it included), so what a fast model leaves passes on to the next."""
    done = {n for n, m in state.get("models", {}).items() if m.get("status") != "running"}
    left = max(1, len([n for n in state.get("order", []) if n not in done]))
    return (deadline - state["models"][running]["started"]) / left


def tail(path: Path, n: int) -> List[str]:
    lines = path.read_text(errors="replace").splitlines(keepends=True) if path.exists() else []
    return [line if line.endswith("\n") else line + "\n" for line in lines[-n:]]


# ---- the model steps (run under the venv's python, with torch) ------------------------------------

def synthetic_episode(batch: int, shots: int, ways: int, size: int, training: bool, seed: int = 0) -> dict:
    """An episode batch as ``fsskern.data`` collates it (docs/architecture.md, "Episode batch"):
    random ImageNet-normalised-like images; the masks are one rectangle per way (query) or per
    shot (support) with a 255 ignore border of 4 pixels; ``base_label`` marks the query's
    foreground as base class 1 (training only). Sizes: images (B, 3, H, W) / (B, S, 3, H, W),
    S = ways * shots way-major, masks int64 (B, H, W) / (B, S, H, W), H = W = size."""
    import torch
    g = torch.Generator().manual_seed(seed)

    def rectangle(label: int) -> "torch.Tensor":
        mask = torch.zeros(size, size, dtype=torch.int64)
        h, w = (int(v) for v in torch.randint(size // 4, size // 2 + 1, (2,), generator=g))
        y, x = (int(v) for v in torch.randint(4, size - max(h, w) - 4, (2,), generator=g))
        mask[y:y + h, x:x + w] = label
        return mask

    def with_border(mask):
        mask[..., :4, :], mask[..., -4:, :], mask[..., :, :4], mask[..., :, -4:] = 255, 255, 255, 255
        return mask

    query_mask = torch.zeros(batch, size, size, dtype=torch.int64)
    for b in range(batch):
        for way in range(ways):
            query_mask[b] = torch.where(rectangle(1) > 0, way + 1, query_mask[b])
    support_masks = torch.stack([torch.stack([rectangle(1) for _ in range(ways * shots)]) for _ in range(batch)])
    episode = {
        "query_img": torch.randn(batch, 3, size, size, generator=g),
        "query_mask": with_border(query_mask),
        "support_imgs": torch.randn(batch, ways * shots, 3, size, size, generator=g),
        "support_masks": with_border(support_masks),
        "classes": torch.arange(1, ways + 1).repeat(batch, 1),
        "index": torch.arange(batch),
    }
    if training:
        episode["base_label"] = torch.where(query_mask == 255, 255, (query_mask > 0).long())
    return episode


def model_config(name: str):
    """The fsskern config of `name` from configs/<name>/ when there is one (the papers' setting
    first: PASCAL, then ResNet/VGG before MobileNet, then by name; its weights and any checkpoint it starts
    from dropped: nothing is read or downloaded), else the defaults with model.name set."""
    from fsskern.engine.config import load_config, with_overrides
    files = sorted((ROOT / "configs" / name).glob("*.yaml"),
                   key=lambda f: (not f.name.startswith("pascal"), "mobilenet" in f.name, f.name))
    if files:
        cfg = with_overrides(load_config(files[0]), {"model.weights": None})
        if (cfg.model.params or {}).get("init"):  # UMTFSS stage C starts from a stage-B run this machine lacks
            cfg = with_overrides(cfg, {"model.params.init": None})
        return cfg, str(files[0].relative_to(ROOT))
    return load_config(tree={"model": {"name": name}}), None


def timed(fn, device: str):
    """fn's result and its seconds, the GPU's queued work included."""
    import torch
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def step_model(cfg, ops: str, size: int, batch: int, device: str) -> dict:
    """Inference then one SGD training step of a freshly built model, each run twice (cold,
    then warm: the warm times are reported). Same seed for every ops backend, so the inference
    logits of fused and reference come from the same weights. A model with no trainable
    parameters or no losses (training-free) gets its training-mode forward only."""
    import torch
    from fsskern.models import create_model
    torch.manual_seed(0)
    model = create_model(cfg.model, ops=ops).to(device)
    shots, ways = cfg.data.shots, cfg.data.ways
    move = lambda episode: {k: v.to(device) for k, v in episode.items()}  # noqa: E731
    eval_batch = move(synthetic_episode(batch, shots, ways, size, training=False))
    train_batch = move(synthetic_episode(batch, shots, ways, size, training=True))
    model.eval()
    with torch.no_grad():
        timed(lambda: model(eval_batch), device)
        out, infer_s = timed(lambda: model(eval_batch), device)
    logits = out["logits"].float()

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9) if params else None

    def train_step():
        losses = model(train_batch)["losses"]
        if optimizer and losses:
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    timed(train_step, device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, train_s = timed(train_step, device)
    return {"inference_ms": infer_s * 1e3, "train_step_ms": train_s * 1e3, "losses": losses,
            "trainable_params": sum(p.numel() for p in params),
            "train_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
            "logits_shape": list(logits.shape), "logits_finite": bool(torch.isfinite(logits).all()), "_logits": logits}


def model_step_problems(sides: dict, diff: float, scale: float) -> List[str]:
    """Why a model's step fails the check: logits or losses not finite on a side, or fused and reference logits
    further apart than LOGIT_TOLERANCE of the reference's largest (at least 1)."""
    problems = [f"{ops}: logits not finite" for ops, side in sides.items() if not side["logits_finite"]]
    problems += [f"{ops}: loss {k} = {v}" for ops, side in sides.items() for k, v in side["losses"].items()
                 if not math.isfinite(v)]
    bound = LOGIT_TOLERANCE * max(1.0, scale)
    if not diff <= bound:  # NaN fails too
        problems.append(f"max |logit diff| {diff:.3g} above {bound:.3g} (fused vs reference)")
    return problems


def run_model_steps(path: Path, size: int, batch: int, device: str = "cuda", resume: bool = False) -> int:
    """Every registered model, fused vs reference, in MODEL_ORDER; the results as JSON at `path`, each model
    marked running (with its start) before it runs. ``resume``: the models `path` already holds are left
    as they are (a fresh process after a CUDA error or a model stopped at its cap). 1 if one failed;
    CUDA_LOST_EXIT after a CUDA error, which leaves this process's CUDA context unusable."""
    import torch
    import fsskern.models
    names = fsskern.models.list_models()
    names = [n for n in MODEL_ORDER if n in names] + [n for n in names if n not in MODEL_ORDER]
    result = (read_json(path) if resume else None) or {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else device, "size": size, "batch": batch,
        "models": {}}
    result["order"] = names
    if not names:
        result["note"] = "no models registered"
    write_json(path, result)
    for name in names:
        if name in result["models"]:
            continue
        print(f"model {name}", flush=True)
        result["models"][name] = {"status": "running", "started": time.time()}
        write_json(path, result)
        try:
            cfg, config_file = model_config(name)
            sides = {ops: step_model(cfg, ops, size, batch, device) for ops in ("fused", "reference")}
            fused, ref = sides["fused"].pop("_logits"), sides["reference"].pop("_logits")
            f, r = sides["fused"], sides["reference"]
            diff = float((fused - ref).abs().max())
            result["models"][name] = {"status": "ok", "config": config_file, "shots": cfg.data.shots,
                                      "ways": cfg.data.ways, **sides, "max_abs_logit_diff": diff,
                                      "inference_speedup": r["inference_ms"] / f["inference_ms"],
                                      "train_speedup": r["train_step_ms"] / f["train_step_ms"]}
            problems = model_step_problems(sides, diff, float(ref.abs().max()))
            if problems:
                result["models"][name].update(status="failed", error="; ".join(problems))
        except Exception as e:  # noqa: BLE001  (one broken model must not hide the others)
            traceback.print_exc()
            result["models"][name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            if device == "cuda" and cuda_context_lost(e):
                write_json(path, result)
                return CUDA_LOST_EXIT
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(result["models"][name]), flush=True)
        write_json(path, result)  # after each model: a timeout keeps the finished ones
    return int(any(m["status"] != "ok" for m in result["models"].values()))


def cuda_context_lost(error: Exception) -> bool:
    """A CUDA error (illegal address, device-side assert, launch failure): every later CUDA call of this
    process fails with it too."""
    return type(error).__name__ == "AcceleratorError" or "CUDA error" in str(error)


# ---- the method benchmarks (run under the venv's python) ------------------------------------------

def bench_rows(log: Path) -> List[dict]:
    """The rows a method benchmark printed (one JSON object a line as each case finishes)."""
    rows = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "fused_s" in row:
                rows.append(row)
    return rows


def run_method_bench(folder: Path, limit: float, device: str = "cuda", quick: bool = False,
                     methods=None, reps: int = METHOD_REPS) -> int:
    """Each method benchmark of ``methods`` (default METHOD_BENCH) in its own process, capped at its
    share of ``limit`` seconds and at what is left of them; its log and its report
    (``<method>-cuda.{json,md}``: targets, op shares) in ``folder``, and after each method
    ``folder/method-bench.json`` with every method's status and rows. 1 if one failed or ran out of time."""
    folder.mkdir(parents=True, exist_ok=True)
    budget = limit - 5  # this child's own start and last write
    deadline = time.monotonic() + budget
    result = {"device": device, "quick": quick, "reps": reps, "methods": {}}
    methods = list(methods or METHOD_BENCH)
    for i, (method, flags, share) in enumerate(methods):
        # its share of the time still left, so what an earlier method did not use passes on to the next
        cap = round(share / sum(m[2] for m in methods[i:]) * (deadline - time.monotonic()), 1)
        log = folder / f"{method}.log"
        for stale in (log, folder / f"{method}-cuda.json", folder / f"{method}-cuda.md"):  # an earlier run's
            stale.unlink(missing_ok=True)                                                 # are never this one's
        argv = [sys.executable, f"benchmarks/models/{method}.py", "--device", device, "--reps", str(reps),
                "--out", str(folder), *flags] + (["--quick"] if quick else [])
        seconds = min(cap, deadline - time.monotonic())
        start = time.monotonic()
        if seconds <= 0:
            rc = None
        else:
            with open(log, "w") as f:
                f.write(f"$ {shlex.join(argv)}\n")
                f.flush()
                try:
                    rc = run_command(argv, {}, seconds, f)
                except Terminated:  # the rows this method printed before the stop still count
                    result["methods"][method] = {"status": "terminated", "rc": None, "cap_s": cap,
                                                 "seconds": round(time.monotonic() - start, 2),
                                                 "rows": bench_rows(log)}
                    (folder / "method-bench.json").write_text(json.dumps(result, indent=1))
                    raise
        status = "ok" if rc == 0 else ("timeout" if rc is None else "failed")
        result["methods"][method] = {"status": status, "rc": rc, "cap_s": cap,
                                     "seconds": round(time.monotonic() - start, 2), "rows": bench_rows(log)}
        print(f"method {method}: {status}, {len(result['methods'][method]['rows'])} rows", flush=True)
        (folder / "method-bench.json").write_text(json.dumps(result, indent=1))
    return int(any(m["status"] != "ok" for m in result["methods"].values()))


def case_label(row: dict) -> str:
    """'473 1-shot infer bf16' from a benchmark row's case fields."""
    parts = [str(row["size"])] if "size" in row else []
    parts += [f"{row['shots']}-shot"] if "shots" in row else []
    parts += [row.get("mode", "?")] + ([row["amp"]] if row.get("amp", "none") != "none" else [])
    return " ".join(parts)


# ---- summary --------------------------------------------------------------------------------------

def junit_counts(path: Path) -> Optional[dict]:
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for s in suites for case in s.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def log_counts(path: Path) -> Optional[dict]:
    """junit_counts from a pytest -v log, for a run stopped before it wrote its XML: the tests that ended."""
    if not path.exists():
        return None
    ends = {}
    for line in path.read_text(errors="replace").splitlines():
        # the outcome is the first of these words after the id, which may hold spaces ("[features must be 4-d]")
        ended = re.match(r"(\S+::.*?) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", line)
        if ended:
            ends[ended.group(1)] = ended.group(2)
    if not ends:
        return None
    outcomes = list(ends.values())
    return {"tests": len(ends), "failures": outcomes.count("FAILED"), "errors": outcomes.count("ERROR"),
            "skipped": outcomes.count("SKIPPED") + outcomes.count("XFAIL"),
            "failed": [n for n, o in ends.items() if o in ("FAILED", "ERROR")], "from_log": True}


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary_lines(gpu: Optional[dict], records: List[dict], out: Path) -> List[str]:
    """summary.md: the GPU, each phase's status and time, then each phase's figures."""
    lines = ["# gpu-check", "",
             f"GPU: {gpu['gpu']} (compute capability {gpu['capability']}, driver {gpu.get('driver') or '?'}; "
             f"found by {gpu['source']}). Results in `{out}`.", "",
             "| phase | status | seconds | limit |", "|---|---|---:|---:|"]
    lines += [f"| {r['phase']} | {r['status']} | {r['seconds']:.1f} | {r['limit_s']:.0f} |" for r in records]
    build = next((r for r in records if r["phase"] == "build"), None)
    if build:
        pip = [s for s in build["steps"] if s["step"].startswith("pip install")]
        if pip:
            lines += ["", f"Build (pip install -e . with CUDA, arch {gpu['capability']}): {pip[0]['seconds']:.0f} s."]
    tests = junit_counts(out / "cuda-tests.xml") or log_counts(out / "cuda-tests.log")
    if tests:
        passed = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
        lines += ["", f"CUDA tests: {tests['tests']} run, {passed} passed, {tests['failures']} failed, "
                  f"{tests['errors']} errors, {tests['skipped']} skipped"
                  + (" (from the log: the run stopped before its XML)." if tests.get("from_log") else ".")]
        lines += [f"- failed: `{name}`" for name in tests["failed"]]
    bench = read_json(out / "bench" / "results.json")
    if bench:
        lines += ["", "| op case | size | reference ms | fsskern ms | speed-up | peers (ms) |",
                  "|---|---|---:|---:|---:|---|"]
        for row in bench["rows"]:
            peers = ", ".join(f"{n} {p['ms']:.3f}" for n, p in row.get("peers", {}).items())
            lines.append(f"| {row['case']} | {row['size']} | {row['reference_ms']:.3f} | {row['fsskern_ms']:.3f} | "
                         f"{row['speedup']:.1f}x | {peers} |")
        lines += [f"| {e['case']} | {e['size']} | FAILED: {e['error']} | | | |" for e in bench.get("errors", [])]
    models = read_json(out / "model-steps.json")
    if models:
        lines += ["", f"Models at {models['size']}x{models['size']}, batch {models['batch']}, warm calls:"]
        if models.get("note"):
            lines.append(f"- {models['note']}")
        for name, m in models["models"].items():
            if m["status"] != "ok":
                lines.append(f"- {name}: {m['status'].upper()} {m.get('error', '')}".rstrip())
                continue
            f, r = m["fused"], m["reference"]
            lines.append(f"- {name}: inference {f['inference_ms']:.1f} ms fused / {r['inference_ms']:.1f} ms "
                         f"reference, train step {f['train_step_ms']:.1f} / {r['train_step_ms']:.1f} ms, "
                         f"max |logit diff| {m['max_abs_logit_diff']:.2e}")
        lines += [f"- {name}: NOT RUN (the phase ended first)" for name in models.get("order", [])
                  if name not in models["models"]]
    methods = read_json(out / "method-bench" / "method-bench.json")
    if methods:
        lines += ["", f"Method benchmarks (median of {methods['reps']}; memory = the allocator's peak of one call; "
                  "targets and op shares in method-bench/<method>-cuda.md):", "",
                  "| method | case | reference s | fused s | speed-up | reference MB | fused MB | memory ratio |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]
        for name, m in methods["methods"].items():
            for row in m["rows"]:
                ref = row.get("reference_s")
                ratio = row.get("memory_ratio")
                lines.append(f"| {name} | {case_label(row)} | " + (
                    f"{ref:.4f} | {row['fused_s']:.4f} | {row['speedup']:.2f}x | "
                    f"{row['reference_peak_extra_mb']:.0f} | " if ref is not None else
                    f"not run | {row['fused_s']:.4f} | - | - | ") +
                    f"{row['fused_peak_extra_mb']:.0f} | {f'{ratio:.2f}' if ratio is not None else '-'} |")
            if m["status"] != "ok":
                lines.append(f"| {name} | {m['status'].upper()} after {m['seconds']:.0f} s (cap {m['cap_s']} s), "
                             f"log method-bench/{name}.log | | | | | | |")
    return lines


# ---- main -----------------------------------------------------------------------------------------

def key_values(items: List[str], flag: str, convert=str) -> Dict[str, object]:
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in PHASES:
            raise SystemExit(f"{flag} wants PHASE=VALUE with PHASE one of {', '.join(PHASES[:-1])}; got {item!r}")
        values[key] = convert(value)
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list the phases and commands, run nothing, exit 0")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("GPU_CHECK_OUT", "runs/gpu-check")),
                        help="results folder (default $GPU_CHECK_OUT, else runs/gpu-check)")
    parser.add_argument("--limit", action="append", default=[], metavar="PHASE=SECONDS",
                        help="a phase's time limit (defaults: " + ", ".join(f"{k} {v}" for k, v in LIMITS.items())
                        + ")")
    parser.add_argument("--skip", action="append", default=[], choices=PHASES[:-1], help="leave a phase out")
    parser.add_argument("--python", default=sys.executable, help="base interpreter the venv is made from")
    parser.add_argument("--venv", type=Path, default=Path(".venv"), help="venv to create or reuse")
    parser.add_argument("--model-size", type=int, default=241, help="model-steps image side (pixels)")
    parser.add_argument("--model-batch", type=int, default=2, help="model-steps episodes per batch")
    parser.add_argument("--pack", type=Path, help="a .tgz of the results folder, rewritten after every phase "
                        "(outside the folder; the device tool brings back a file, not a tree)")
    parser.add_argument("--deadline-s", type=float, help="seconds from the start by which every phase has ended: "
                        f"each phase's limit shrinks to what is left less {RESERVE_S} s for the summary, and the "
                        "last phase's grows to it unless --limit names that phase")
    # internal: the model-steps and method-bench children, and the hooks the tests drive the phase logic with
    parser.add_argument("--run-model-steps", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--continue", dest="resume", action="store_true", help=argparse.SUPPRESS)  # model steps
    parser.add_argument("--run-method-bench", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--method-limit", type=float, default=LIMITS["method-bench"], help=argparse.SUPPRESS)
    parser.add_argument("--fake-gpu", help=argparse.SUPPRESS)  # "NAME,CAPABILITY"
    parser.add_argument("--fake-phase", action="append", default=[], help=argparse.SUPPRESS)  # PHASE=SHELL COMMAND
    args = parser.parse_args(argv)
    args.limits = {**LIMITS, **key_values(args.limit, "--limit", float)}
    args.fake_phase = key_values(args.fake_phase, "--fake-phase")
    args.python = shutil.which(args.python) or args.python  # its folder holds the base's ninja
    args.out = (ROOT / args.out) if not args.out.is_absolute() else args.out
    args.venv = (ROOT / args.venv) if not args.venv.is_absolute() else args.venv
    if args.pack is not None:
        args.pack = args.pack.resolve()
        if args.pack.is_relative_to(args.out.resolve()):
            raise SystemExit(f"--pack {args.pack} is inside the results folder {args.out}, which it packs")
    return args


def pack(folder: Path, dest: Optional[Path]) -> None:
    """``folder`` as ``dest`` (.tgz), replaced whole (a stop mid-write leaves the previous pack)."""
    if dest is None:
        return
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tmp, "w:gz") as tar:
            tar.add(folder, arcname=folder.name)
        os.replace(tmp, dest)
    except OSError as e:  # a failed pack must not cost the check
        print(f"gpu-check: packing {folder} into {dest} failed: {e}", file=sys.stderr, flush=True)


def dry_run(args, base: dict, gpu: Optional[dict], phases: List[Phase]) -> int:
    print(f"gpu-check --dry-run: nothing is run. Results would go to {args.out}")
    print(f"GPU: {gpu['gpu']}, compute capability {gpu['capability']} ({gpu['source']})" if gpu
          else f"{no_gpu_message(base)}: a real run would stop here, exit {NO_GPU_EXIT}")
    print(f"base interpreter: {base['python']} (torch {base.get('torch') or 'not installed'}); venv {args.venv}"
          + (" exists: reused" if (args.venv / "bin" / "python").exists() else ""))
    total = 0.0
    for phase in phases:
        total += phase.limit_s
        print(f"\n[{phase.name}] limit {phase.limit_s:.0f} s, log {phase.log}")
        for step in phase.steps:
            env = " ".join(f"{k}={v}" for k, v in step.env.items() if k != "PATH")
            print(f"  $ {env + ' ' if env else ''}{step.title}")
        for output in phase.outputs:
            print(f"  -> {output}")
    print(f"\n[summary] {args.out / 'timings.json'}, {args.out / 'summary.md'}; the short summary printed last")
    print(f"\nphase limits add up to {total:.0f} s; skipped: {', '.join(args.skip) or 'none'}")
    if args.deadline_s is not None:
        print(f"deadline {args.deadline_s:.0f} s: a phase gets at most what is left of it less {RESERVE_S} s")
    if args.pack is not None:
        print(f"packed after every phase into {args.pack}")
    return 0


def main(argv=None) -> int:
    start = time.monotonic()  # --deadline-s counts from here, the GPU probe included
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    if args.run_model_steps:
        return run_model_steps(args.run_model_steps, args.model_size, args.model_batch, resume=args.resume)
    if args.run_method_bench:
        return run_method_bench(args.run_method_bench, args.method_limit)
    # a fake GPU (tests) needs no probe unless the venv is to be made
    need_probe = not args.fake_gpu or not (args.venv / "bin" / "python").exists()
    base = probe_python(args.python) if need_probe else {"python": args.python, "torch": None}
    gpu = find_gpu(base, args.fake_gpu)
    phases = plan(args, base, gpu)
    if args.dry_run:
        return dry_run(args, base, gpu, phases)
    args.out.mkdir(parents=True, exist_ok=True)
    if gpu is None:
        message = (f"{no_gpu_message(base)}. Nothing was built or run: this check needs one NVIDIA GPU "
                   "(`make gpu-check ARGS=--dry-run` lists what it would do).")
        (args.out / "summary.md").write_text(f"# gpu-check\n\n{message}\n")
        pack(args.out, args.pack)
        print(message, file=sys.stderr)
        return NO_GPU_EXIT
    print(f"gpu-check on {gpu['gpu']} (compute capability {gpu['capability']}); results in {args.out}", flush=True)
    records = []

    def write_timings():  # after every phase too: a SIGKILL past the device tool's limit keeps what finished
        timings = {"gpu": gpu, "base": base, "total_s": round(time.monotonic() - start, 2), "phases": records}
        (args.out / "timings.json").write_text(json.dumps(timings, indent=2))
        pack(args.out, args.pack)
        return timings

    try:
        for phase in phases:
            phase_start = time.monotonic()
            if args.deadline_s is not None:
                left = args.deadline_s - RESERVE_S - (phase_start - start)
                # cut to what is left, and the last phase (the method benchmarks) also takes what earlier phases
                # did not use, unless the command line capped it: the device's time is rare, and a second call
                # repeats every method
                grows = phase is phases[-1] and phase.name not in key_values(args.limit, "--limit", float)
                if left < phase.limit_s or (grows and left > phase.limit_s):
                    phase = make_phase(phase.name, args, base, gpu, max(0.0, left))
            records.append(run_phase(phase))
            write_timings()
    except Terminated:  # the summary of what finished still gets written and printed
        records.append({"phase": phase.name, "status": "terminated", "limit_s": phase.limit_s,
                        "log": str(phase.log), "steps": [], "seconds": round(time.monotonic() - phase_start, 2)})
        print(f"   {phase.name} TERMINATED (SIGTERM); writing the summary of what finished", flush=True)
    timings = write_timings()
    lines = summary_lines(gpu, records, args.out)
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    pack(args.out, args.pack)
    print("\n" + "\n".join(lines) + f"\n\ntotal {timings['total_s']:.0f} s", flush=True)
    return int(any(r["status"] != "ok" for r in records))


if __name__ == "__main__":
    sys.exit(main())
