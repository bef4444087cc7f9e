"""python/gpu_check.py without a GPU: the dry run, the no-GPU refusal, phase isolation and time
limits (phases replaced by shell commands through its internal --fake-gpu/--fake-phase hooks),
the venv it makes from a base interpreter, and the model-step and method-bench helpers on the CPU."""
import json
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "python" / "gpu_check.py"
PHASES = ["build", "cuda-tests", "op-bench", "model-steps", "method-bench"]


gpu_check = load_script(SCRIPT)


def run(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def alive(pid):
    """Running (a killed child whose parent died may linger as a zombie until PID 1 reaps it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_dry_run_lists_every_phase_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    result = run("--dry-run", "--out", out)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    positions = [text.index(f"[{name}]") for name in PHASES + ["summary"]]
    assert positions == sorted(positions)
    assert "FSSKERN_CUDA=1 TORCH_CUDA_ARCH_LIST=" in text and f"MAX_JOBS={os.cpu_count()}" in text
    assert "benchmarks/run.py --device cuda" in text and "-k 'cuda and not simt'" in text
    assert "--run-model-steps" in text and "--run-method-bench" in text
    assert "[build] limit 150 s" in text and "phase limits add up to 550 s" in text
    if not torch.cuda.is_available():
        assert "NO GPU on this machine" in text and "a real run would stop here, exit 2" in text
    assert not out.exists()


def test_dry_run_skip_and_limits(tmp_path):
    result = run("--dry-run", "--out", tmp_path, "--skip", "build", "--limit", "op-bench=200",
                 "--fake-gpu", "G,9.0")
    assert result.returncode == 0, result.stderr
    assert "[build]" not in result.stdout and "[op-bench] limit 200 s" in result.stdout
    bad = run("--dry-run", "--limit", "bench=5")
    assert bad.returncode != 0 and "PHASE=VALUE with PHASE one of build" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_says_so_and_exits_non_zero(tmp_path):
    # any base interpreter: the system's python3 probes fastest where it has no torch (the dry run
    # above covers a torch that sees no device)
    result = run("--out", tmp_path, "--python", shutil.which("python3") or sys.executable)
    assert result.returncode == 2
    assert "NO GPU on this machine" in result.stderr and "Nothing was built or run" in result.stderr
    assert "NO GPU" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "timings.json").exists() and not (tmp_path / "build.log").exists()


def test_a_failed_or_timed_out_phase_does_not_stop_the_next(tmp_path):
    pid_file, ran = tmp_path / "sleeper.pid", tmp_path / "model-steps-ran"
    # an earlier run's results in the same folder: its figures must not pass for this run's
    (tmp_path / "model-steps.json").write_text(json.dumps({"size": 65, "batch": 1, "models": {
        "old": {"status": "failed", "error": "from an earlier run"}}}))
    start = time.monotonic()
    result = run("--out", tmp_path, "--fake-gpu", "Fake GPU,9.0",
                 "--fake-phase", "build=echo building",
                 "--fake-phase", "cuda-tests=echo one test broke; exit 3",
                 # a child that outlives its shell unless the whole process group is killed
                 "--fake-phase", f"op-bench=sleep 60 & echo $! > {pid_file}; wait", "--limit", "op-bench=2",
                 "--fake-phase", f"model-steps=touch {ran}", "--fake-phase", "method-bench=true")
    assert time.monotonic() - start < 30
    assert result.returncode == 1, result.stdout + result.stderr
    timings = json.loads((tmp_path / "timings.json").read_text())
    status = {r["phase"]: r["status"] for r in timings["phases"]}
    assert status == {"build": "ok", "cuda-tests": "failed", "op-bench": "timeout", "model-steps": "ok",
                      "method-bench": "ok"}
    assert ran.exists()
    assert timings["phases"][1]["steps"][0]["rc"] == 3 and timings["phases"][2]["steps"][0]["rc"] is None
    assert "one test broke" in (tmp_path / "cuda-tests.log").read_text()
    assert "killed at the phase limit of 2 s" in (tmp_path / "op-bench.log").read_text()
    assert "from an earlier run" not in (tmp_path / "summary.md").read_text()
    assert not alive(int(pid_file.read_text()))
    summary = (tmp_path / "summary.md").read_text()
    assert "Fake GPU (compute capability 9.0" in summary
    assert "| cuda-tests | failed |" in summary and "| op-bench | timeout |" in summary
    # the short summary is what the run prints last
    assert result.stdout.rstrip().splitlines()[-1].startswith("total ")
    assert "| model-steps | ok |" in result.stdout.split("# gpu-check")[-1]


def test_sigterm_stops_the_running_phase_and_still_writes_the_summary(tmp_path):
    """The device tool's limit (or `timeout`) sends SIGTERM: the running phase's children go with it, the
    phases that finished are in the summary, and nothing is left running on the GPU."""
    pid_file = tmp_path / "sleeper.pid"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--fake-gpu", "Fake GPU,9.0",
                             "--fake-phase", "build=echo building",
                             "--fake-phase", f"cuda-tests=sleep 60 & echo $! > {pid_file}; wait"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    start = time.monotonic()
    proc.terminate()
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - start < 15 and proc.returncode == 1, out + err
    assert not alive(int(pid_file.read_text()))
    status = {r["phase"]: r["status"] for r in json.loads((tmp_path / "timings.json").read_text())["phases"]}
    assert status == {"build": "ok", "cuda-tests": "terminated"}
    assert "| cuda-tests | terminated |" in (tmp_path / "summary.md").read_text()


def test_summary_reads_the_phase_outputs(tmp_path):
    (tmp_path / "cuda-tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_cuda" name="test_a"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_cuda" name="test_b"/><testcase classname="tests.test_cuda" name="test_c">'
        '<skipped/></testcase></testsuite></testsuites>')
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "results.json").write_text(json.dumps({"rows": [
        {"case": "prior", "size": "B4", "reference_ms": 2.0, "fsskern_ms": 0.5, "speedup": 4.0, "peers": {}}]}))
    (tmp_path / "model-steps.json").write_text(json.dumps({"size": 65, "batch": 1, "models": {},
                                                           "note": "no models registered"}))
    (tmp_path / "method-bench").mkdir()
    rows = [{"shots": 1, "mode": "train", "amp": "bf16", "reference_s": 0.5, "fused_s": 0.25, "speedup": 2.0,
             "reference_peak_extra_mb": 1000.0, "fused_peak_extra_mb": 600.0, "memory_ratio": 0.6},
            {"shots": 5, "mode": "train", "fused_s": 0.4, "fused_peak_extra_mb": 900.0}]  # a reference not run
    (tmp_path / "method-bench" / "method-bench.json").write_text(json.dumps({"reps": 3, "methods": {
        "dpcl": {"status": "ok", "rows": rows},
        "crcnet": {"status": "timeout", "seconds": 35.2, "cap_s": 35,
                   "rows": [{**rows[0], "size": 473, "mode": "infer", "amp": "none"}]}}}))
    records = [{"phase": "build", "status": "ok", "seconds": 100.0, "limit_s": 210,
                "steps": [{"step": "pip install --no-build-isolation", "rc": 0, "seconds": 95.0}]}]
    text = "\n".join(gpu_check.summary_lines({"gpu": "G", "capability": "9.0", "source": "test"}, records, tmp_path))
    assert "Build (pip install -e . with CUDA, arch 9.0): 95 s." in text
    assert "CUDA tests: 3 run, 1 passed, 1 failed, 0 errors, 1 skipped." in text
    assert "`tests.test_cuda::test_a`" in text
    assert "| prior | B4 | 2.000 | 0.500 | 4.0x |" in text and "- no models registered" in text
    assert "| dpcl | 1-shot train bf16 | 0.5000 | 0.2500 | 2.00x | 1000 | 600 | 0.60 |" in text
    assert "| dpcl | 5-shot train | not run | 0.4000 | - | - | 900 | - |" in text
    assert "| crcnet | 473 1-shot infer | 0.5000 |" in text
    assert "| crcnet | TIMEOUT after 35 s (cap 35 s), log method-bench/crcnet.log |" in text


def test_venv_from_a_base_venv_sees_its_torch(tmp_path):
    if not torch.version.cuda:
        pytest.skip("this torch is a CPU build: the check would make the venv with `make venv`")
    # what probe_python reports for this interpreter (the dry run above runs the probe itself)
    base = {"python": sys.executable, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "in_venv": sys.prefix != sys.base_prefix, "site": site.getsitepackages()}
    args = gpu_check.parse_args(["--venv", str(tmp_path / "venv"), "--fake-gpu", "G,9.0"])
    steps = gpu_check.venv_steps(args, base)
    assert "--system-site-packages" in steps[0].title
    for step in steps:
        step.action(None, 60.0) if step.action else subprocess.run(step.argv, check=True, capture_output=True)
    probe = "import sys, torch; print(sys.prefix); print(torch.__file__)"
    prefix, torch_file = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c", probe], check=True,
                                        capture_output=True, text=True).stdout.split()
    assert Path(prefix) == tmp_path / "venv" and Path(torch_file).resolve() == Path(torch.__file__).resolve()
    assert gpu_check.venv_steps(args, base) == []  # made once, then reused


def test_synthetic_episode_follows_the_batch_contract():
    ep = gpu_check.synthetic_episode(batch=2, shots=3, ways=2, size=65, training=True)
    assert ep["query_img"].shape == (2, 3, 65, 65) and ep["query_img"].dtype == torch.float32
    assert ep["support_imgs"].shape == (2, 6, 3, 65, 65)
    assert ep["query_mask"].shape == (2, 65, 65) and ep["query_mask"].dtype == torch.int64
    assert ep["support_masks"].shape == (2, 6, 65, 65) and ep["support_masks"].dtype == torch.int64
    assert set(ep["query_mask"].unique().tolist()) <= {0, 1, 2, 255} and (ep["query_mask"] == 1).any()
    assert set(ep["support_masks"].unique().tolist()) == {0, 1, 255}
    assert (ep["support_masks"].flatten(2).eq(1).sum(2) > 0).all()  # every shot has foreground
    assert ep["classes"].tolist() == [[1, 2], [1, 2]] and ep["index"].tolist() == [0, 1]
    assert set(ep["base_label"].unique().tolist()) == {0, 1, 255}
    assert "base_label" not in gpu_check.synthetic_episode(1, 1, 1, 65, training=False)


def test_every_model_builds_from_its_config_without_files(tmp_path, monkeypatch):
    """The device machine has the tracked tree only: no weights, no runs/. Each model-steps config must build
    from nothing (UMTFSS's stage-C config starts from a stage-B checkpoint: dropped)."""
    from fsskern.models import create_model, list_models
    monkeypatch.chdir(tmp_path)  # relative paths (weights/, runs/) resolve to an empty folder
    for name in list_models():
        cfg, _ = gpu_check.model_config(name)
        create_model(cfg.model, "fused")


def test_model_steps_on_cpu(tmp_path, monkeypatch):
    """The model-steps child on the CPU: one registered model fused vs reference, then none."""
    import fsskern.models
    from fsskern.models import registry

    class TinyPrototypeNet(torch.nn.Module):
        """A conv, masked average pooling through the backend, cosine logits, one loss."""

        def __init__(self, cfg, backend):
            super().__init__()
            self.backend, self.conv = backend, torch.nn.Conv2d(3, 8, 3, stride=4, padding=1)

        def forward(self, batch):
            q = self.conv(batch["query_img"])
            s = self.conv(batch["support_imgs"].flatten(0, 1))
            masks = torch.stack([batch["support_masks"] == 0, batch["support_masks"] == 1], 2).flatten(0, 1)
            protos = self.backend.masked_average_pool(s, masks.float(), resize="mask")
            protos = protos.view(*batch["support_masks"].shape[:2], 2, -1).mean(1)
            logits = torch.nn.functional.interpolate(torch.einsum("bpc,bchw->bphw", protos, q),
                                                     size=batch["query_img"].shape[-2:], mode="bilinear")
            losses = {"ce": torch.nn.functional.cross_entropy(logits, batch["query_mask"], ignore_index=255)}
            return {"logits": logits, "losses": losses if self.training else {}}

    monkeypatch.setattr(registry, "_MODELS", {"tiny": TinyPrototypeNet})
    path = tmp_path / "steps.json"
    assert gpu_check.run_model_steps(path, size=65, batch=2, device="cpu") == 0
    tiny = json.loads(path.read_text())["models"]["tiny"]
    assert tiny["status"] == "ok" and tiny["config"] is None
    assert tiny["max_abs_logit_diff"] < 1e-4 and tiny["fused"]["logits_shape"] == [2, 2, 65, 65]
    assert tiny["fused"]["trainable_params"] == 8 * 3 * 9 + 8 and set(tiny["reference"]["losses"]) == {"ce"}
    assert abs(tiny["fused"]["losses"]["ce"] - tiny["reference"]["losses"]["ce"]) < 1e-4

    class BrokenKernel(TinyPrototypeNet):
        """What a wrong CUDA kernel looks like from here: the fused side's logits off by their own size."""

        def forward(self, batch):
            out = super().forward(batch)
            return {**out, "logits": out["logits"] * (2.0 if self.backend.name == "fused" else 1.0)}

    class NotFinite(TinyPrototypeNet):
        def forward(self, batch):
            out = super().forward(batch)
            return {**out, "losses": {k: v * float("nan") for k, v in out["losses"].items()}}

    # it used to record "ok" whatever the numbers were
    monkeypatch.setattr(registry, "_MODELS", {"broken": BrokenKernel, "nan": NotFinite, "tiny": TinyPrototypeNet})
    monkeypatch.setattr(gpu_check, "MODEL_ORDER", ["tiny", "absent"])
    assert gpu_check.run_model_steps(path, size=65, batch=2, device="cpu") == 1
    assert json.loads(path.read_text())["order"] == ["tiny", "broken", "nan"]  # the models of MODEL_ORDER first
    models = json.loads(path.read_text())["models"]
    assert models["broken"]["status"] == "failed" and "max |logit diff|" in models["broken"]["error"]
    assert models["nan"]["status"] == "failed" and "fused: loss ce = nan" in models["nan"]["error"]
    assert models["tiny"]["status"] == "ok"
    (tmp_path / "model-steps.json").write_text(path.read_text())
    summary = "\n".join(gpu_check.summary_lines({"gpu": "G", "capability": "9.0", "source": "test"}, [], tmp_path))
    assert "- broken: FAILED max |logit diff|" in summary

    monkeypatch.setattr(registry, "_MODELS", {})
    assert fsskern.models.list_models() == []
    assert gpu_check.run_model_steps(path, size=65, batch=1, device="cpu") == 0
    assert json.loads(path.read_text()) == {"device": "cpu", "size": 65, "batch": 1, "models": {}, "order": [],
                                            "note": "no models registered"}


FAKE_MODEL_STEPS = """
import json, sys, time
path = sys.argv[1]
state = json.load(open(path)) if "--continue" in sys.argv else {"order": ["hangs", "breaks_cuda", "ok"], "models": {}}
def write():  # truncate then write, as a careless child would: the watcher must never act on half a file
    with open(path, "w") as f:
        f.write(json.dumps(state)[:20])
        f.flush()
        time.sleep(0.05)
        f.write(json.dumps(state)[20:])
for name in state["order"]:
    if name in state["models"]:
        continue
    state["models"][name] = {"status": "running", "started": time.time()}
    write()
    if name == "hangs":
        time.sleep(60)
    if name == "breaks_cuda":
        state["models"][name] = {"status": "failed", "error": "AcceleratorError: CUDA error: illegal memory access"}
        write()
        sys.exit(3)
    state["models"][name] = {"status": "ok"}
    write()
sys.exit(int(any(m["status"] != "ok" for m in state["models"].values())))
"""


def test_model_steps_watch_caps_a_hung_model_and_goes_on_in_a_fresh_process(tmp_path):
    """A model past its share of the phase is stopped and recorded; a CUDA error (the child exits 3: its
    context is lost) hands the models left to a fresh process; the phase ends with the list."""
    result, script = tmp_path / "steps.json", tmp_path / "child.py"
    script.write_text(FAKE_MODEL_STEPS)
    start = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        rc = gpu_check.watch_model_steps([sys.executable, str(script), str(result)], result, 9.0, log, poll=0.1)
    assert time.monotonic() - start < 8.5  # the hung model got its 3 s share, not the phase
    models = json.loads(result.read_text())["models"]
    assert rc == 1 and models["ok"] == {"status": "ok"}
    assert models["hangs"]["status"] == "timeout" and "its share of the phase" in models["hangs"]["error"]
    assert models["breaks_cuda"]["status"] == "failed"
    assert "model hangs: stopped after" in (tmp_path / "log").read_text()
    state = json.loads(result.read_text())
    del state["models"]["ok"]  # as if the phase had ended before it
    (tmp_path / "model-steps.json").write_text(json.dumps({"size": 65, "batch": 1, **state}))
    summary = "\n".join(gpu_check.summary_lines({"gpu": "G", "capability": "9.0", "source": "test"}, [], tmp_path))
    assert "- hangs: TIMEOUT stopped after" in summary and "- breaks_cuda: FAILED AcceleratorError" in summary
    assert "- ok: NOT RUN" in summary


def test_deadline_shrinks_the_phases_and_every_phase_is_packed(tmp_path):
    """--deadline-s: each phase gets at most what is left (less the summary's reserve); --pack holds the folder
    after each phase, so a run stopped from outside still brings back what finished."""
    import tarfile
    out, packed = tmp_path / "out", tmp_path / "check.tgz"
    start = time.monotonic()
    # 8 s past the reserve: the script's own start-up counts against it, and on a loaded machine took 2-3 s
    result = run("--out", out, "--fake-gpu", "Fake GPU,9.0", "--deadline-s", gpu_check.RESERVE_S + 8,
                 "--pack", packed, "--fake-phase", "build=sleep 1", "--fake-phase", "cuda-tests=sleep 30",
                 "--fake-phase", "op-bench=true", "--skip", "model-steps", "--skip", "method-bench")
    assert time.monotonic() - start < 20, result.stdout
    status = {r["phase"]: (r["status"], r["limit_s"]) for r in json.loads((out / "timings.json").read_text())["phases"]}
    assert status["build"][0] == "ok" and status["cuda-tests"][0] == "timeout" and status["cuda-tests"][1] < 7.5
    assert status["op-bench"] == ("timeout", 0.0)
    with tarfile.open(packed) as tar:
        assert {"out/summary.md", "out/timings.json", "out/build.log"} <= set(tar.getnames())
    assert run("--out", out, "--fake-gpu", "G,9.0", "--pack", out / "x.tgz", "--dry-run").returncode != 0
    # with time to spare the last phase takes it (op-bench's own limit is 80 s; a second call would repeat it)
    roomy = run("--out", tmp_path / "roomy", "--fake-gpu", "Fake GPU,9.0", "--deadline-s", gpu_check.RESERVE_S + 200,
                "--fake-phase", "build=true", "--fake-phase", "cuda-tests=true", "--fake-phase", "op-bench=true",
                "--skip", "model-steps", "--skip", "method-bench")
    assert roomy.returncode == 0, roomy.stdout
    limits = {r["phase"]: r["limit_s"] for r in json.loads((tmp_path / "roomy" / "timings.json").read_text())["phases"]}
    assert limits["cuda-tests"] == gpu_check.LIMITS["cuda-tests"] and limits["op-bench"] > 150
    capped = run("--out", tmp_path / "capped", "--fake-gpu", "Fake GPU,9.0", "--deadline-s", gpu_check.RESERVE_S + 200,
                 "--fake-phase", "build=true", "--fake-phase", "cuda-tests=true", "--fake-phase", "op-bench=true",
                 "--skip", "model-steps", "--skip", "method-bench", "--limit", "op-bench=30")
    phases = json.loads((tmp_path / "capped" / "timings.json").read_text())["phases"]
    assert capped.returncode == 0 and phases[-1]["limit_s"] == 30  # a cap the command line set is kept


def test_method_bench_never_reports_an_earlier_runs_rows(tmp_path):
    """A method given no time keeps no rows from the folder's earlier run (its old log and report are gone)."""
    folder = tmp_path / "mb"
    folder.mkdir()
    (folder / "rilfs.log").write_text('{"fused_s": 1.0, "reference_s": 2.0}\n')
    (folder / "rilfs-cuda.md").write_text("old")
    assert gpu_check.run_method_bench(folder, limit=3, device="cpu", methods=[("rilfs", [], 1.0)]) == 1
    state = json.loads((folder / "method-bench.json").read_text())["methods"]["rilfs"]
    assert state["status"] == "timeout" and state["rows"] == [] and not (folder / "rilfs-cuda.md").exists()


def test_test_counts_come_from_the_log_when_the_run_stopped_before_its_xml(tmp_path):
    (tmp_path / "cuda-tests.log").write_text(
        "tests/test_cuda.py::test_a PASSED [ 10%]\ntests/test_cuda.py::test_b FAILED [ 20%]\n"
        "tests/test_cuda.py::test_c SKIPPED (no GPU) [ 30%]\ntests/test_cuda.py::test_d \n"
        "tests/test_cuda.py::test_bad_inputs[features must be 4-d] FAILED [ 40%]\n")  # an id with spaces
    summary = "\n".join(gpu_check.summary_lines({"gpu": "G", "capability": "9.0", "source": "test"}, [], tmp_path))
    assert "CUDA tests: 4 run, 1 passed, 2 failed, 0 errors, 1 skipped (from the log" in summary


def test_method_bench_on_cpu(tmp_path):
    """The method-bench child on the CPU at the quick size: a method that finishes leaves its rows and
    report in the folder; one that reaches its cap is recorded as a timeout, and the run returns 1; the
    time a method leaves unused passes on to the next."""
    methods = [("dpcl", ["--only", "0"], 0.01), ("umtfss", ["--only", "4"], 0.99)]  # dpcl: a 1 s cap
    rc = gpu_check.run_method_bench(tmp_path, limit=105, device="cpu", quick=True, methods=methods, reps=1)
    assert rc == 1
    result = json.loads((tmp_path / "method-bench.json").read_text())
    umtfss, dpcl = result["methods"]["umtfss"], result["methods"]["dpcl"]
    assert umtfss["status"] == "ok" and umtfss["rc"] == 0
    (row,) = umtfss["rows"]
    assert row["mode"] == "proto" and row["shots"] == 1 and row["fused_s"] > 0 and row["speedup"] > 0
    assert (tmp_path / "umtfss-quick.md").exists() and (tmp_path / "umtfss-quick.json").exists()
    assert "--out" in (tmp_path / "umtfss.log").read_text().splitlines()[0]
    assert dpcl["status"] == "timeout" and dpcl["rc"] is None and dpcl["rows"] == [] and dpcl["cap_s"] == 1.0
    assert 97 < umtfss["cap_s"] <= 99  # 0.99 / 0.99 of the 100 s minus dpcl's second (and its stop)
    assert not (tmp_path / "dpcl-quick.md").exists()
