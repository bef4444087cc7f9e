"""The engine's promises: typed config, exact resume after SIGKILL, DDP == one process with the same
global batch, checkpoints that are refused when bad and never half-written, NaN stops, evaluation
independent of the worker count."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import load_script  # noqa: E402
from engine_support import data_overrides, make_folder_dataset  # noqa: E402

from fsskern.engine import checkpoint as ckpt  # noqa: E402
from fsskern.engine import trainer  # noqa: E402
from fsskern.engine.config import ConfigError, dump_yaml, load_config, load_yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
       "OMP_NUM_THREADS": "1"}
TRAIN = [sys.executable, "-c", "import sys, engine_support; from fsskern.engine.cli import train_main; "
                               "sys.exit(train_main(sys.argv[1:]))"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = make_folder_dataset(tmp_path_factory.mktemp("folder"))
    (root / "tiny.yaml").write_text("model:\n  name: tiny_panet\n")
    return root


def tiny(dataset, out, *extra):
    return [str(dataset / "tiny.yaml"), *data_overrides(dataset), f"out={out}", "train.iters=8",
            "train.lr=0.05", "train.checkpoint_every=2", "train.val_episodes=0", "data.batch_size=2",
            "data.num_workers=0", "train.log_every=1", *extra]


def run_train(args, **kw):
    return subprocess.run(TRAIN + args, env=ENV, capture_output=True, text=True, timeout=300, **kw)


def write_config(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("seed: 3\n")
    return path


def weights(out):
    return ckpt.load(Path(out) / "last.pt")["model"]


def same_weights(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


# --- config ------------------------------------------------------------------------------------

def test_config_overrides_types_and_bases(tmp_path):
    (tmp_path / "base.yaml").write_text("data:\n  shots: 5\n  fold: 1\nmodel:\n  params: {a: 1}\n")
    (tmp_path / "cfg.yaml").write_text("base: base.yaml\ndata:\n  fold: 2\nmodel:\n  params: {b: 2}\n")
    cfg = load_config(tmp_path / "cfg.yaml", ["eval.seeds=[0,1,2]", "train.lr=1", "data.train_list=null",
                                                     "train.weight_decay=1e-4"])
    assert (cfg.data.shots, cfg.data.fold, cfg.eval.seeds) == (5, 2, [0, 1, 2])
    assert cfg.model.params == {"a": 1, "b": 2} and cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 1e-4
    # YAML 1.2's scalars (YamlLoader): 1e-4 is a float in any field (1.1 reads a string, which a params float or an
    # augment range then refused), 0123 is not octal, off stays a string
    cfg = load_config(tmp_path / "cfg.yaml", ["model.params.lr=1e-4", "data.augment.scale=[8e-1,1.2]", "seed=0123",
                                              "model.params.profile=off"])
    assert cfg.model.params["lr"] == 1e-4 and cfg.data.augment["scale"] == [0.8, 1.2] and cfg.seed == 123
    assert cfg.model.params["profile"] == "off"
    # a dotted augment key edits the default PFENet augmentation when no file names one (it replaced it: the
    # other steps, missing from the mapping, were off); a file's own mapping is edited the same way
    default = load_config(tmp_path / "cfg.yaml").data.augment
    assert load_config(tmp_path / "cfg.yaml", ["data.augment.flip=false"]).data.augment == {**default, "flip": False}
    (tmp_path / "aug.yaml").write_text("data:\n  augment: {scale: [1.0, 1.5], flip: true}\n")
    assert load_config(tmp_path / "aug.yaml", ["data.augment.flip=false"]).data.augment == {"scale": [1.0, 1.5],
                                                                                          "flip": False}
    # a section whose lines are all commented out is null: refused over a base that sets it (it dropped the base's
    # whole section for the defaults), and `{}` clears it on purpose
    (tmp_path / "commented.yaml").write_text("base: base.yaml\ndata:\n  # fold: 3\n")
    with pytest.raises(ConfigError, match="data is empty \\(null\\) over a base that sets it"):
        load_config(tmp_path / "commented.yaml")
    with pytest.raises(ConfigError, match="model.params is empty"):
        load_config(tmp_path / "cfg.yaml", ["model.params=null"])
    assert load_config(tmp_path / "cfg.yaml", ["data={}"]).data.fold == 0


@pytest.mark.parametrize("override, message", [
    ("data.shot=1", r"unknown config key\(s\) data.shot; valid keys of data: dataset, root, fold, shots"),
    ("bogus=1", r"unknown config key\(s\) bogus; valid keys: out, seed"),
    ("data.fold=one", r"data.fold must be int, got 'one'"),
    ("ops=fast", r"ops must be one of fused, reference, got 'fast'"),
    ("eval.seeds=3", r"eval.seeds must be a list"),
    ("eval.seeds=[]", r"eval.seeds must name at least one seed"),
    ("eval.seeds=[0,1,0]", r"eval.seeds repeats a seed: \[0, 1, 0\]"),  # its std over seeds would read 0
    ("eval.resize=crop", r"eval.resize must be one of pfenet, square, original, got 'crop'"),
    ("eval.score_at=label", r"eval.score_at must be one of original, input, got 'label'"),
    ("eval.support_annotation=scribble", r"eval.support_annotation must be one of mask, box, got 'scribble'"),
    ("data.fold", r"not of the form key=value"),
    ("train.accumulate=0", r"train.accumulate must be >= 1, got 0"),
    ("train.checkpoint_every=0", r"train.checkpoint_every must be >= 1, got 0"),
    ("eval.batch_size=0", r"eval.batch_size must be >= 1, got 0"),  # else refused only by the final validation
    ("data.test_size=0", r"data.test_size must be >= 1, got 0"),
    ("train.lr=.nan", r"train.lr must be finite, got nan"),  # nan < 0 is False: it passed the >= 0 check
    ("train.epochs=.inf", r"train.epochs must be finite, got inf"),
    ("train=0", r"train must be a mapping, got 0"),  # not the defaults in place of the file's train block
])
def test_config_refuses_bad_keys(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path), [override])


def test_run_info_names_fsskern_not_the_repository_around_an_installed_copy(tmp_path):
    """pip install . puts fsskern in site-packages, often inside the user's own repository (a project .venv): its
    commit said nothing about fsskern's code. Only a checkout (.git beside csrc/) names a commit; the version always."""
    from fsskern import __version__
    from fsskern.engine.logging import git_commit, write_run_info
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q", str(tmp_path)], check=True)
    subprocess.run([*git, "-C", str(tmp_path), "commit", "-q", "--allow-empty", "-m", "theirs"], check=True)
    assert git_commit(tmp_path) == "unknown"
    (tmp_path / "csrc").mkdir()  # the layout of an fsskern checkout
    assert git_commit(tmp_path).split("-")[0] == subprocess.run([*git, "-C", str(tmp_path), "rev-parse", "HEAD"],
                                                                capture_output=True, text=True).stdout.strip()
    write_run_info(load_config(write_config(tmp_path)), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "run.json").read_text())["fsskern"] == __version__


# --- checkpoints -------------------------------------------------------------------------------

def test_checkpoint_atomic_and_refusals(tmp_path):
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"model": {"w": torch.ones(3)}}, path)
    assert torch.equal(ckpt.load(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="cut.pt cannot be read"):
        ckpt.load(tmp_path / "cut.pt")
    torch.save({"state_dict": {}, "epoch": 3}, tmp_path / "pfenet.pth")
    with pytest.raises(ckpt.CheckpointError, match=r"pfenet.pth is not an fsskern checkpoint \(found \['epoch'"):
        ckpt.load(tmp_path / "pfenet.pth")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load(tmp_path / "nothing.pt")


def test_failed_save_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save_atomic({"model": {"w": torch.zeros(2)}}, path)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_atomic({"model": {"w": torch.ones(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(ckpt.load(path)["model"]["w"], torch.zeros(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# --- training ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_epochs_count_the_folds_own_pool(dataset, tmp_path):
    """train.epochs: the iterations from the fold's counted training pool (every query image once per epoch), as the
    papers budget; the run's config records the count, and the poly schedule ends with it."""
    from fsskern.engine.data import train_dataset
    args = tiny(dataset, tmp_path / "run", "train.iters=0", "train.epochs=1.5", "train.accumulate=2",
                "train.warmup_epochs=0.5")
    per_epoch = len(train_dataset(load_config(args[0], args[1:])).manifest.episodes)
    want = -(-3 * per_epoch // (2 * 2 * 2))  # ceil(1.5 epochs x pool / (batch 2 x accumulate 2))
    result = run_train(args)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "run" / "done.json").read_text())["iteration"] == want > 1
    saved = load_config(tmp_path / "run" / "config.yaml").train
    assert saved.iters == want and saved.warmup_iters == -(-per_epoch // 8)  # the warm-up's half epoch, counted alike
    clash = run_train(tiny(dataset, tmp_path / "clash", "train.iters=5", "train.epochs=1.5"))
    assert clash.returncode != 0 and "train.iters=5 says otherwise" in clash.stderr
    alone = run_train(tiny(dataset, tmp_path / "alone", "train.warmup_epochs=1"))
    assert alone.returncode != 0 and "set train.epochs, or give the warm-up as train.warmup_iters" in alone.stderr


def test_sigkill_then_resume_is_bit_identical(dataset, tmp_path):
    iters = 16  # checkpoints every 2: seven chances to land the kill between them
    full = run_train(tiny(dataset, tmp_path / "full", f"train.iters={iters}"))
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(TRAIN + tiny(dataset, out, f"train.iters={iters}"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once a checkpoint past the start, and before the last, exists
        if (out / "last.pt").is_file() and proc.poll() is None:
            try:
                # the final checkpoint is written while the process still runs: killing then is no mid-run kill
                if 2 <= ckpt.load(out / "last.pt")["iteration"] < iters:
                    break
            except ckpt.CheckpointError:
                pass  # never expected (atomic writes); retried rather than asserted to keep the kill timely
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = ckpt.load(out / "last.pt")["iteration"]
    assert 2 <= killed_at < iters

    def rows_to_kill():  # logged before the kill; a run that started over would log them again, other step times
        rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines() if r.endswith("}")]
        return [r for r in rows if r["iteration"] <= killed_at]
    before = rows_to_kill()
    again = run_train(tiny(dataset, out, f"train.iters={iters}", "resume=true"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert same_weights(weights(tmp_path / "full"), weights(out))
    assert before and rows_to_kill() == before  # it continued from last.pt, not from the start


@pytest.mark.slow
def test_ddp_two_gloo_processes_equal_one_process(dataset, tmp_path):
    no_dropout = "model.params={dropout: 0.0}"  # dropout masks are drawn per rank: not comparable
    one = run_train(tiny(dataset, tmp_path / "one", "data.batch_size=4", "train.iters=3", no_dropout))
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
                "-m", "engine_support_train"]
    two = subprocess.run(torchrun + tiny(dataset, tmp_path / "two", "data.batch_size=2", "train.iters=3", no_dropout),
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    # Same episodes, same global batch; gradients are averaged in another order: fp32 rounding only.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # and the same logged losses: every rank's episodes, not rank 0's half of them
    logged = [[json.loads(r)["train/loss"] for r in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
               if "train/loss" in r] for run in ("one", "two")]
    assert len(logged[0]) == 3
    torch.testing.assert_close(torch.tensor(logged[1]), torch.tensor(logged[0]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device, bound", [("cuda", 1), ("cuda:3", "refused"), ("cpu", None)])
def test_process_group_backends_per_device(monkeypatch, device, bound):
    """Under torchrun on GPUs each rank binds its own GPU and the group carries gloo beside nccl: the engine also
    reduces CPU tensors (the non-finite flag, the parsing confusion matrix), which plain nccl rejects. (No GPU
    here to run nccl itself; this pins the arguments.)"""
    from fsskern.engine import distributed
    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda backend: calls.update(backend=backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(device=str(d) if ":" in str(d) else d))
    if bound == "refused":  # one named GPU for every rank: nccl would refuse it later, less clearly
        with pytest.raises(ValueError, match="names one GPU for all 2 processes"):
            distributed.init_from_env(device)
        return
    distributed.init_from_env(device)
    if bound is None:
        assert calls == {"backend": "gloo"}
    else:
        assert calls == {"backend": "cpu:gloo,cuda:nccl", "device": bound}


def test_validation_scores_rank_0s_buffers(monkeypatch):
    """Before a validation every rank takes rank 0's buffers (its BatchNorm statistics, which the last step updated
    from its own batch): the reduced score is then that of the best.pt rank 0 saves. (Two ranks faked.)"""
    from fsskern.engine import distributed
    bn = torch.nn.BatchNorm2d(3)
    sent = []
    monkeypatch.setattr(distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "broadcast", lambda t, src: sent.append((t.data_ptr(), src)))
    distributed.sync_buffers(bn)
    assert sent == [(b.data_ptr(), 0) for b in bn.buffers()] and len(sent) == 3


class NonFiniteGradient(torch.nn.Module):
    """A finite loss whose gradient is NaN for ``b`` (sqrt at 0) and finite for ``a``: what fp16's first steps
    do to one optimizer's parameters."""

    def __init__(self, cfg, backend):
        super().__init__()
        self.a, self.b = torch.nn.Parameter(torch.tensor(3.0)), torch.nn.Parameter(torch.tensor(0.0))

    def forward(self, batch):
        return {"losses": {"l": (self.a - 1) ** 2 + self.b.abs().sqrt()}}


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_a_non_finite_gradient_steps_no_optimizer(dataset, tmp_path, monkeypatch, clip):
    """A finite loss with a non-finite gradient anywhere: the joint norm is inf, and the step is skipped for every
    optimizer (the others would decay weights on the zero gradients the clipping makes). Without clipping too:
    stepping on it would save nan weights as the last good checkpoint."""
    from fsskern.engine.trainer import train
    from fsskern.models import registry
    monkeypatch.setitem(registry._MODELS, "nonfinite_grad", NonFiniteGradient)
    cfg = load_config(None, [*data_overrides(dataset), f"out={tmp_path}", "model.name=nonfinite_grad",
                             "train.iters=1", f"train.clip_grad={clip}", "train.weight_decay=0.1", "train.lr=0.1",
                             "train.val_episodes=0", "data.batch_size=1", "data.num_workers=0"])
    with pytest.warns(UserWarning, match="iteration 1: the gradient norm is (inf|nan); no optimizer stepped"):
        train(cfg)
    after = weights(tmp_path)
    assert after["a"].item() == 3.0 and after["b"].item() == 0.0


def test_a_failed_final_validation_keeps_the_last_step_and_a_resume_reruns_it(dataset, tmp_path, monkeypatch):
    """The final checkpoint is written before the final validation: a validation that raises (memory, a bad eval
    setting) loses no step, even in a run shorter than checkpoint_every; the resume validates and finishes."""
    cfg = load_config(str(dataset / "tiny.yaml"), [*data_overrides(dataset), f"out={tmp_path}", "train.iters=2",
                                                   "train.val_episodes=2", "data.val_fraction=0",
                                                   "data.val_classes=[5]", "data.batch_size=1", "data.num_workers=0"])

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "evaluate_model", broken)
        with pytest.raises(RuntimeError, match="out of memory"):
            trainer.train(cfg)
    assert ckpt.load(tmp_path / "last.pt")["iteration"] == 2 and trainer.finished_at(tmp_path) is None
    trainer.train(load_config(str(tmp_path / "config.yaml"), ["resume=true"]))
    assert trainer.finished_at(tmp_path) == 2 and ckpt.load(tmp_path / "last.pt")["best"]["iteration"] == 2
    assert (tmp_path / "best.pt").is_file()


def test_resume_keeps_what_the_model_selection_scores_with(tmp_path):
    """Any eval setting may change on resume but the one validation scores with: best.pt's mIoU would be compared
    with another protocol's metric. Validation resizes by its own rule, so eval.resize and eval.score_at may."""
    from fsskern.engine.config import to_dict
    from fsskern.engine.trainer import changed_settings
    then = to_dict(load_config(write_config(tmp_path)))
    assert changed_settings(then, to_dict(load_config(write_config(tmp_path), ["eval.episodes=7"]))) == []
    assert changed_settings(then, to_dict(load_config(write_config(tmp_path), ["eval.resize=original",
                                                                               "eval.score_at=input"]))) == []
    assert changed_settings(then, to_dict(load_config(write_config(tmp_path), ["eval.protocol=panet"]))) == [
        "eval.protocol 'pfenet' -> 'panet'"]


def test_a_schedule_past_the_run_is_said(dataset, tmp_path):
    from fsskern.engine.trainer import train
    cfg = load_config(str(dataset / "tiny.yaml"), [*data_overrides(dataset), f"out={tmp_path}", "train.iters=1",
                                                   "train.warmup_iters=5", "train.lr_steps=[1]", "train.val_episodes=0",
                                                   "data.batch_size=1", "data.num_workers=0"])
    with pytest.warns(UserWarning, match=r"warmup_iters=5 and train.lr_steps=\[1\] reach past train.iters=1"):
        train(cfg)


def test_a_nan_validation_stops_even_as_the_first(monkeypatch):
    """A NaN validation mIoU stops the run; checked before the comparison, since a NaN stored as the first best
    would never be beaten (every later `miou > nan` is False) and best.pt would stay the NaN model."""
    from fsskern.engine import trainer
    monkeypatch.setattr(trainer, "evaluate_model", lambda *a, **k: {"miou": float("nan"), "fb_iou": float("nan")})
    cfg = load_config(None, ["train.val_episodes=10", "data.val_fraction=0.1"])
    logger, saved = type("Logger", (), {"scalars": lambda self, *a: None})(), []
    with pytest.raises(trainer.NonFiniteLossError, match="validation mIoU is NaN at iteration 7"):
        trainer.validate(cfg, torch.nn.Linear(1, 1), {"iteration": 7, "best": None}, logger, lambda: saved.append(1))
    assert saved == []


def test_parameter_groups_may_be_generators():
    """A model's param_groups may hand over module.parameters() generators, as torch.optim accepts them:
    listed once (a generator read to test for emptiness used to leave the optimizer with nothing)."""
    from fsskern.engine.config import TrainConfig
    from fsskern.engine.optim import build_optimizers

    class TwoGroups(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 3), torch.nn.Linear(2, 2)

        def param_groups(self, cfg):
            return [{"params": self.a.parameters()}, {"params": self.b.parameters(), "optimizer": "adamw"},
                    {"params": (p for p in self.frozen.parameters() if False)}]

    adamw, sgd = build_optimizers(TwoGroups(), TrainConfig())
    assert [len(g["params"]) for g in sgd.param_groups] == [2] and [len(g["params"]) for g in adamw.param_groups] == [2]


def test_log_every_averages_rows_and_logs_the_step_lr(dataset, tmp_path):
    """train.log_every: one metrics.jsonl row every N iterations and at the last, losses averaged over the
    window, and the LR the logged step used (the warm-up's first step: lr / warmup_iters)."""
    out = tmp_path / "log"
    done = run_train(tiny(dataset, out, "train.iters=5", "train.log_every=2", "train.warmup_iters=4",
                          "train.checkpoint_every=5"))
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["iteration"] for r in train_rows] == [2, 4, 5]
    assert train_rows[0]["train/lr"] == pytest.approx(0.05 * 2 / 4)  # step 2 of the warm-up used factor 2/4
    assert train_rows[-1]["train/lr"] == pytest.approx(0.05 * (1 - 4 / 5) ** 0.9)


def test_a_phase_counts_its_budget_one_way():
    """A phase that sets train.epochs (or iters, and the warm-up's pair) sets the other to 0, and says which
    command-line count it shadows: it inherited the run's other count, and the two disagreed (a PASCAL RILFS run
    shortened by train.iters=3 train.epochs=0 stopped at its base phase's epochs, told to set one of them to 0)."""
    phase = {"name": "base", "config": {"train.epochs": 0.5, "train.warmup_iters": 2}}
    with pytest.warns(UserWarning) as said:
        settings = trainer.phase_settings(phase, ["train.iters=3", "train.epochs=0"])
    assert [str(w.message).split(";")[0] for w in said] == ["phase 'base' counts its budget by its own "
                                                            "train.epochs=0.5", "phase 'base' keeps its own "
                                                            "train.epochs=0.5"]
    assert settings == {"train.epochs": 0.5, "train.iters": 0, "train.warmup_iters": 2, "train.warmup_epochs": 0}
    assert trainer.phase_settings({"name": "meta"}, ["train.iters=3"]) == {}


def test_fractional_epochs_are_counted_exactly():
    cfg = load_config(tree={"data": {"batch_size": 10}})
    assert trainer.iters_for_epochs(cfg, 100, 1.1) == 11  # float arithmetic: ceil(11.000000000000002) = 12
    assert trainer.iters_for_epochs(cfg, 100, 0.25) == 3 and trainer.iters_for_epochs(cfg, 7, 200) == 140


def test_a_phase_keeps_its_own_settings_and_says_so(dataset, tmp_path):
    """A phase's own value beats the run's key=value (as RILFS's base phase keeps its iterations), with a warning
    naming it; the phases that do not set the key take the command line's. A data.fold other than the one a
    phase is written for (its fold:) is refused before any work."""
    config = tmp_path / "phased.yaml"
    config.write_text("model:\n  name: tiny_panet\ntrain:\n  phases:\n"
                      "    - {name: a, fold: 0, config: {train.iters: 3}}\n"
                      "    - {name: b, config: {train.lr: 0.01}}\n")
    args = [str(config), *data_overrides(dataset), f"out={tmp_path / 'run'}", "train.lr=0.05",
            "train.checkpoint_every=100", "train.val_episodes=0", "data.batch_size=2", "data.num_workers=0"]
    res = run_train(args + ["train.iters=2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "phase 'a' keeps its own train.iters=3" in res.stderr and "phase 'b' keeps its own train.lr=0.01" in res.stderr
    for phase, iters, lr in (("a", 3, 0.05), ("b", 2, 0.01)):
        assert json.loads((tmp_path / "run" / phase / "done.json").read_text())["iteration"] == iters
        assert load_config(tmp_path / "run" / phase / "config.yaml").train.lr == lr
    refused = run_train(args + ["train.iters=2", "data.fold=1", f"out={tmp_path / 'fold1'}"])
    assert refused.returncode == 2 and "phase 'a' is written for data.fold=0" in refused.stderr
    assert not (tmp_path / "fold1").exists()
    # a rerun, or a resume with a setting the run did not have, is refused before the run's config.yaml (which
    # evaluate.py reads) takes it
    before = (tmp_path / "run" / "config.yaml").read_text()
    again = run_train(args + ["train.iters=2", "train.lr=0.5"])
    assert again.returncode != 0 and "already holds a run" in again.stderr
    other = run_train(args + ["train.iters=2", "train.lr=0.5", "resume=true"])
    assert other.returncode != 0 and "resume: train.lr 0.05 -> 0.5 differ from the run in" in other.stderr
    assert (tmp_path / "run" / "config.yaml").read_text() == before


def test_a_phase_is_refused_other_folds_than_its_own(tmp_path):
    """A phase's fold: decides, not its own data.fold: UMTFSS's fold-1 config takes data.fold=1 (benchmarks/methods.py
    passes every recipe its fold) though its stage B sets the pseudo dataset's data.fold 0, and refuses 0; the
    PASCAL recipe, whose stages A and B serve every fold, takes any fold; without the phases the fold is free.
    (The refusal once read the phase's data.fold: methods.py's UMTFSS fold 1 and PASCAL's folds 1-3 were refused.)"""
    from fsskern.engine.trainer import refuse_other_fold
    umtfss = ROOT / "configs" / "umtfss"
    fold1 = load_config(umtfss / "msrc_v2_mobilenet_v2_fold1.yaml", ["data.fold=1"])
    assert fold1.train.phases[0]["config"]["data.fold"] == 0
    refuse_other_fold(fold1)
    with pytest.raises(ConfigError, match="phase 'unsup' is written for data.fold=1"):
        refuse_other_fold(load_config(umtfss / "msrc_v2_mobilenet_v2_fold1.yaml", ["data.fold=0"]))
    with pytest.raises(ConfigError, match="phase 'unsup' is written for data.fold=0"):
        refuse_other_fold(load_config(umtfss / "msrc_v2_mobilenet_v2.yaml", ["data.fold=1"]))
    refuse_other_fold(load_config(umtfss / "msrc_v2_mobilenet_v2.yaml", ["data.fold=1", "train.phases=[]"]))
    refuse_other_fold(load_config(umtfss / "pascal_mobilenet_v2.yaml", ["data.fold=2"]))
    # train() itself refuses, before it writes anything to out; a fold that is no number is refused too
    from fsskern.engine.trainer import train
    out = tmp_path / "refused"
    with pytest.raises(ConfigError, match="phase 'unsup' is written for data.fold=1"):
        train(load_config(umtfss / "msrc_v2_mobilenet_v2_fold1.yaml", ["data.fold=0", f"out={out}"]))
    assert not out.exists()
    with pytest.raises(ConfigError, match="fold must be a fold number; got '1'"):
        refuse_other_fold(load_config(tree={"train": {"phases": [{"name": "a", "fold": "1"}]}}))


def test_refuses_to_overwrite_a_run(dataset, tmp_path):
    out = tmp_path / "run"
    assert run_train(tiny(dataset, out, "train.iters=2")).returncode == 0
    again = run_train(tiny(dataset, out, "train.iters=2"))
    assert again.returncode != 0 and "already holds a run" in again.stderr
    longer = run_train(tiny(dataset, out, "train.iters=4", "resume=true"))  # its poly schedule has ended
    assert longer.returncode != 0 and "finished at iteration 2, and train.iters is 4" in longer.stderr
    other = run_train(tiny(dataset, out, "train.iters=2", "resume=true", "data.fold=1"))  # not passed off as done
    assert other.returncode != 0 and "resume: data.fold 0 -> 1 differ" in other.stderr
    # resuming with another seed or batch would read other episodes than the run it claims to continue; another
    # fold would train on its test classes; another lr would not apply (the optimizer state holds the saved one)
    (out / "done.json").unlink()  # as if killed after its last checkpoint
    moved = run_train(tiny(dataset, out, "train.iters=2", "resume=true", "seed=9", "data.batch_size=1",
                           "data.fold=1", "train.lr=0.1"))
    assert moved.returncode != 0 and "resume: data.fold 0 -> 1; seed 0 -> 9; train.lr 0.05 -> 0.1; episodes per " \
        "step per micro-batch (data.batch_size x world size) 2 -> 1 differ" in moved.stderr
    assert "train.iters" not in moved.stderr.split("differ")[0]
    rows = (out / "metrics.jsonl").read_text()
    moved_data = tmp_path / "moved"
    shutil.copytree(dataset, moved_data)  # a preempted job back on a machine with the data elsewhere
    kept = run_train(tiny(dataset, out, "train.iters=2", "resume=true", "train.log_every=5", "data.num_workers=1",
                          f"data.root={moved_data}"))
    assert kept.returncode == 0, kept.stderr[-3000:]  # what runs it and how it logs may change
    assert (out / "metrics.jsonl").read_text() == rows  # nothing past the checkpoint was logged twice


def test_a_stale_done_json_does_not_pass_a_resumed_run_off_as_finished(dataset, tmp_path):
    """done.json counts only with the last.pt it was written after. An earlier run's, left beside a later run's
    checkpoint (its last.pt removed, a new run started there and killed), made the resume return at once."""
    from fsskern.engine.trainer import finished_at
    out = tmp_path / "run"
    assert run_train(tiny(dataset, out, "train.iters=4")).returncode == 0
    assert finished_at(out) == 4 and not list(out.glob(".done.json.*"))  # written through a temporary file
    payload = ckpt.load(out / "last.pt")
    payload["iteration"] = 2  # a later run in the folder, killed after its second iteration
    ckpt.save_atomic(payload, out / "last.pt")
    assert finished_at(out) is None
    res = run_train(tiny(dataset, out, "train.iters=4", "resume=true"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert ckpt.load(out / "last.pt")["iteration"] == 4 and finished_at(out) == 4  # it trained to the end
    (out / "last.pt").unlink()
    assert finished_at(out) is None  # the demo retrains such a folder, as the trainer does
    (out / "done.json").write_text('{"iterat')  # cut by a kill (written in place before the fix)
    assert finished_at(out) is None


def test_resume_keeps_the_record_of_a_best_pt_written_past_the_checkpoint(dataset, tmp_path, monkeypatch):
    """Validation at 3 writes best.pt (mIoU 50), the run dies before the next last.pt, and the resume (from 2)
    validates at 4 only (val_every changed): 40 must not beat the checkpoint's older record (none) and overwrite
    the better best.pt."""
    from fsskern.engine import trainer
    scores = {3: 50.0, 4: 40.0}
    state_of = {}

    def fake_evaluate(cfg, model, progress=False):
        return {"miou": scores[state_of["it"]], "fb_iou": 0.0}

    real_validate = trainer.validate

    def validate(cfg, model, state, logger, save_best):
        state_of["it"] = state["iteration"]
        ran = real_validate(cfg, model, state, logger, save_best)
        if state["iteration"] == 3 and state_of.pop("kill", False):
            raise KeyboardInterrupt  # killed after best.pt, before the next last.pt
        return ran

    monkeypatch.setattr(trainer, "evaluate_model", fake_evaluate)
    monkeypatch.setattr(trainer, "validate", validate)
    out = tmp_path / "run"
    args = tiny(dataset, out, "train.iters=4", "train.checkpoint_every=2", "train.val_episodes=2",
                "data.val_fraction=0", "data.val_classes=[5]")
    state_of["kill"] = True
    with pytest.raises(KeyboardInterrupt):
        trainer.train(load_config(args[0], [*args[1:], "train.val_every=3"]))
    assert ckpt.load(out / "last.pt")["iteration"] == 2 and ckpt.load(out / "best.pt")["iteration"] == 3
    trainer.train(load_config(args[0], [*args[1:], "train.val_every=4", "resume=true"]))
    assert ckpt.load(out / "best.pt")["iteration"] == 3
    assert json.loads((out / "done.json").read_text())["best"] == {"miou": 50.0, "iteration": 3}


def test_resumed_logs_drop_what_a_crash_logged_past_the_checkpoint(tmp_path):
    from fsskern.engine.logging import RunLogger
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "train/loss": 1.0}) + "\n"
                                                    for i in range(1, 8)) + '{"iterat')  # cut by the kill
    RunLogger(tmp_path, total=10, start=4).close()
    assert [json.loads(r)["iteration"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_validation_that_cannot_make_an_episode_is_refused_before_training(dataset, tmp_path):
    """Two ways from one validation class: refused at the start, not at the end of the run."""
    res = run_train(tiny(dataset, tmp_path / "r", "data.val_fraction=0", "data.val_classes=[5]", "data.ways=2",
                         "train.val_episodes=4"))
    assert res.returncode != 0 and "validation split: 1 classes" in res.stderr
    assert not (tmp_path / "r" / "last.pt").exists()


def test_a_trainable_model_without_a_budget_is_refused(dataset, tmp_path):
    res = run_train(tiny(dataset, tmp_path / "r", "train.iters=0"))
    assert res.returncode != 0 and "train.iters and train.epochs are both 0" in res.stderr
    assert not (tmp_path / "r" / "done.json").exists()


def test_no_held_out_images_means_no_validation(dataset, tmp_path):
    """With data.val_fraction 0 there is nothing to validate on: the end-of-training validation is skipped (it
    raised after the last step and lost the final checkpoint), and a periodic one is refused before training."""
    out = tmp_path / "noval"
    done = run_train(tiny(dataset, out, "train.iters=2", "train.val_episodes=20", "data.val_fraction=0"))
    assert done.returncode == 0, done.stderr
    assert ckpt.load(out / "last.pt")["iteration"] == 2 and not (out / "best.pt").exists()
    refused = run_train(tiny(dataset, tmp_path / "noval2", "train.val_every=1", "train.val_episodes=20",
                             "data.val_fraction=0"))
    assert refused.returncode != 0 and "data.val_fraction is 0" in refused.stderr
    assert not (tmp_path / "noval2" / "last.pt").exists()


def test_nan_loss_stops_with_message_and_keeps_checkpoint(dataset, tmp_path):
    out = tmp_path / "nan"
    res = run_train(tiny(dataset, out, "train.lr=1e30", "train.iters=30", "train.checkpoint_every=1"))
    assert res.returncode != 0
    assert "loss is not finite at iteration" in res.stderr and "the last good checkpoint is" in res.stderr
    payload = ckpt.load(out / "last.pt")
    assert all(torch.isfinite(v).all() for v in payload["model"].values())


# --- evaluation --------------------------------------------------------------------------------

def baseline_args(dataset, out, *extra):
    return [*data_overrides(dataset), "model.name=baseline", "model.backbone=mobilenet_v2", "model.weights=null",
            "eval.episodes=12", "eval.seeds=[0,1]", "eval.protocol=balanced", "eval.min_class_episodes=0",
            f"out={out}", "data.test_size=65", *extra]


@pytest.mark.slow
def test_ddp_evaluation_equals_one_process(dataset, tmp_path):
    """Two gloo ranks evaluate disjoint shards of the manifest and gather their rows."""
    config = dataset / "baseline.yaml"
    config.write_text("model:\n  name: baseline\n")
    script = str(ROOT / "python" / "evaluate.py")
    one = subprocess.run([sys.executable, script, str(config), *baseline_args(dataset, tmp_path / "one")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29534",
                          script, str(config), *baseline_args(dataset, tmp_path / "two", "data.num_workers=0")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("one", "two"))
    for key in ("miou", "fb_iou", "per_class", "manifest_sha256"):
        assert a[key] == b[key], key
    assert [s["episodes"] for s in b["per_seed"]] == [12, 12]


def test_a_stale_best_checkpoint_does_not_outlive_a_fresh_run(dataset, tmp_path):
    """A run stopped after a validation but before its first last.pt left best.pt: the run that starts over there
    (without validating) removes it, so evaluating the folder takes this run's last.pt, not the other's best."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"an earlier run's")
    run = run_train(tiny(dataset, tmp_path / "run", "train.iters=2", "resume=true"))
    assert run.returncode == 0, run.stderr[-3000:]
    assert "removes that best.pt" in run.stderr
    assert not (tmp_path / "run" / "best.pt").exists() and (tmp_path / "run" / "last.pt").is_file()


def test_config_yaml_reads_back_the_same_with_either_schema():
    """A run's config.yaml (dump_yaml) quotes any string that YAML 1.1 or 1.2 would read as another type, so it
    reads back equal with the engine's loader and with plain PyYAML."""
    tree = {"a": "1e5", "b": 1e-5, "c": "off", "d": "0123", "e": [0.8, 1.2], "f": True, "g": "yes", "h": None,
            "i": "12:30", "j": 12, "k": "runs/x"}
    text = dump_yaml(tree)
    assert load_yaml(text) == tree and yaml.safe_load(text) == tree


def test_negative_budgets_are_refused(tmp_path):
    for override in ("train.iters=-3", "train.epochs=-1", "train.warmup_iters=-1", "data.num_workers=-1",
                     "train.clip_grad=-1", "train.poly_power=-0.9", "train.lr=-0.01", "train.weight_decay=-1e-4"):
        with pytest.raises(ConfigError, match=">= 0"):
            load_config(write_config(tmp_path), [override])
    assert load_config(write_config(tmp_path), ["train.clip_grad=0"]).train.clip_grad == 0  # no clipping


def test_step_schedule_is_panets_multistep_lr(tmp_path):
    """train.lr_steps: after the warm-up, the LR drops by lr_gamma at each listed step, as torch's MultiStepLR."""
    from fsskern.engine.optim import build_schedulers
    cfg = load_config(write_config(tmp_path), ["train.iters=30", "train.lr_steps=[10,20]", "train.lr=0.001"]).train
    param = torch.zeros(1, requires_grad=True)
    ours = torch.optim.SGD([param], lr=cfg.lr)
    theirs = torch.optim.SGD([param], lr=cfg.lr)
    schedulers = build_schedulers([ours], cfg) + [torch.optim.lr_scheduler.MultiStepLR(theirs, [10, 20], 0.1)]
    lrs = []
    for _ in range(30):
        lrs.append((ours.param_groups[0]["lr"], theirs.param_groups[0]["lr"]))
        for o, s in zip((ours, theirs), schedulers):
            o.step()
            s.step()
    assert [a for a, _ in lrs] == pytest.approx([b for _, b in lrs])
    assert lrs[9][0] == pytest.approx(1e-3) and lrs[10][0] == pytest.approx(1e-4) and lrs[29][0] == pytest.approx(1e-5)
    for bad in ("[20,10]", "[0,10]", "[10,10]"):
        with pytest.raises(ConfigError, match="lr_steps must be increasing"):
            load_config(write_config(tmp_path), [f"train.lr_steps={bad}"])
    with pytest.raises(ConfigError, match=">= 0"):
        load_config(write_config(tmp_path), ["train.lr_gamma=-0.1"])


def test_an_override_that_is_no_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"override 'eval.seeds=\[0,1': its value is not YAML"):
        load_config(write_config(tmp_path), ["eval.seeds=[0,1"])


def test_resume_refuses_a_checkpoint_of_other_optimizers(dataset, tmp_path):
    """A model whose parameter groups changed with the code builds another number of optimizers than the
    checkpoint holds: zip once restored some of them and left the rest from scratch, silently."""
    out = tmp_path / "run"
    assert run_train(tiny(dataset, out, "train.iters=2")).returncode == 0
    payload = ckpt.load(out / "last.pt")
    payload["optimizers"].append(payload["optimizers"][0])
    ckpt.save_atomic(payload, out / "last.pt")
    (out / "done.json").unlink()
    res = run_train(tiny(dataset, out, "train.iters=2", "resume=true"))
    assert res.returncode != 0 and "holds 2 optimizers, and the model now builds 1" in res.stderr


def test_evaluating_a_training_config_needs_its_weights(dataset, tmp_path, capsys):
    """evaluate.py CONFIG of a model that trains would score untrained weights: refused unless a checkpoint is
    named or train.iters=0 says so; and a run folder is never written over (its config.yaml, run.json)."""
    from fsskern.engine.cli import evaluate_main
    assert run_train(tiny(dataset, tmp_path / "run", "train.iters=2")).returncode == 0
    common = [*data_overrides(dataset), "eval.episodes=2", "eval.seeds=[0]", "eval.min_class_episodes=0",
              "data.num_workers=0"]
    assert evaluate_main([str(dataset / "tiny.yaml"), *common, "train.iters=4", f"out={tmp_path / 'e'}"]) == 2
    before = (tmp_path / "run" / "config.yaml").read_text()
    assert evaluate_main([str(dataset / "tiny.yaml"), *common, f"out={tmp_path / 'run'}",
                          f"eval.checkpoint={tmp_path / 'run' / 'last.pt'}"]) == 2
    assert (tmp_path / "run" / "config.yaml").read_text() == before
    assert evaluate_main([str(dataset / "tiny.yaml"), *common, f"out={tmp_path / 'e'}",
                          f"eval.checkpoint={tmp_path / 'run' / 'last.pt'}"]) == 0
    assert evaluate_main([str(dataset / "tiny.yaml"), *common, "train.iters=0", f"out={tmp_path / 'u'}"]) == 0
    # a run folder is scored on the fold it trained on: another fold's test classes include its training classes
    fold = load_config(tmp_path / "run" / "config.yaml").data.fold
    assert evaluate_main([str(tmp_path / "run"), *common, f"data.fold={fold + 1}"]) == 2
    assert f"was trained on fold {fold} of" in capsys.readouterr().err
    alias = os.path.relpath(data_overrides(dataset)[0].split("=", 1)[1])  # the same folder, spelt otherwise
    assert evaluate_main([str(tmp_path / "run"), *common, f"data.root={alias}", f"data.fold={fold + 1}"]) == 2
    assert f"was trained on fold {fold} of" in capsys.readouterr().err
    # the same fold number under another split is another fold (COCO's conventions number different classes)
    assert evaluate_main([str(tmp_path / "run"), *common, "data.fold_convention=contiguous"]) == 2
    assert f"was trained on fold {fold}, fold_convention interleaved of" in capsys.readouterr().err
    # so is a config given the run's checkpoint (its own config says its fold)
    assert evaluate_main([str(dataset / "tiny.yaml"), *common, f"data.fold={fold + 1}", f"out={tmp_path / 'f'}",
                          f"eval.checkpoint={tmp_path / 'run' / 'last.pt'}"]) == 2
    assert f"was trained on fold {fold} of" in capsys.readouterr().err
    # a recipe counted in epochs or phases trains too; a multi-phase run keeps its checkpoints in its phases
    assert evaluate_main([str(dataset / "tiny.yaml"), *common, "train.epochs=2", f"out={tmp_path / 'e'}"]) == 2
    (tmp_path / "phased" / "meta").mkdir(parents=True)
    (tmp_path / "phased" / "meta" / "last.pt").write_bytes(b"")
    assert evaluate_main([str(dataset / "tiny.yaml"), *common, "train.iters=0", f"out={tmp_path / 'phased'}"]) == 2


def test_bad_data_or_weights_files_are_named_not_a_traceback(dataset, tmp_path, capsys):
    from fsskern.engine.cli import evaluate_main, train_main
    common = [*data_overrides(dataset), "eval.episodes=2", "eval.seeds=[0]", "eval.min_class_episodes=0",
              "data.num_workers=0", "data.classes=nowhere.tsv"]
    assert evaluate_main([str(dataset / "tiny.yaml"), *common, "train.iters=0", f"out={tmp_path / 'e'}"]) == 2
    assert "fsskern-evaluate: missing class list file: " in capsys.readouterr().err
    assert train_main([str(dataset / "tiny.yaml"), *common, "train.iters=1", f"out={tmp_path / 't'}"]) == 2
    assert "fsskern-train: missing class list file: " in capsys.readouterr().err
    weights = tmp_path / "w.pt"
    torch.save({"unrelated": torch.zeros(1)}, weights)
    assert train_main([str(dataset / "tiny.yaml"), *common[:-1], "train.iters=1", f"model.weights={weights}",
                       f"out={tmp_path / 'w'}"]) == 2
    assert "fsskern-train: " in capsys.readouterr().err


def test_baseline_metrics_identical_for_0_and_2_workers(dataset, tmp_path):
    from fsskern.engine.evaluator import evaluate
    results = []
    for workers in (0, 2):
        cfg = load_config(None, baseline_args(dataset, tmp_path / str(workers), f"data.num_workers={workers}"))
        results.append(evaluate(cfg))
    metrics = [json.loads((tmp_path / str(w) / "metrics.json").read_text()) for w in (0, 2)]
    for key in ("miou", "fb_iou", "miou_std", "per_class", "per_seed", "manifest_sha256", "protocol"):
        assert metrics[0][key] == metrics[1][key], key
    assert set(metrics[0]) >= {"miou", "fb_iou", "miou_std", "per_class", "per_seed", "episodes", "protocol",
                               "manifest_sha256", "config"}


def test_evaluation_scores_where_the_protocol_says(dataset, tmp_path):
    """PANet and HSNet score at the input size; the others at the original label size (restore_logits). The
    recorded protocol and the transform that scores must agree."""
    from fsskern.engine.data import eval_dataset
    # eval.score_at replaces the protocol's place: HSNet's --use_original_imgsize is hsnet with score_at=original
    for protocol, score_at, extra in (("panet", "input", ()), ("hsnet", "input", ()), ("balanced", "original", ()),
                                      ("hsnet", "original", ("eval.score_at=original",))):
        ds, info = eval_dataset(load_config(None, baseline_args(dataset, tmp_path, f"eval.protocol={protocol}",
                                                                *extra)), 0)
        assert ds.transform.score_at == info["protocol"]["score_at"] == score_at, protocol
        assert ds[0]["restore"]["score_at"] == score_at


def test_box_supports_reach_the_evaluation_dataset(dataset, tmp_path):
    """``eval.support_annotation=box`` swaps the support masks for boxes on the same episodes and says so."""
    from fsskern.engine.data import eval_dataset
    boxes, info = eval_dataset(load_config(None, baseline_args(dataset, tmp_path, "eval.support_annotation=box")), 0)
    masks, mask_info = eval_dataset(load_config(None, baseline_args(dataset, tmp_path)), 0)
    assert boxes.support_boxes and not masks.support_boxes
    assert info["protocol"]["support_annotation"] == "box" and mask_info["protocol"]["support_annotation"] == "mask"
    assert info["manifest_sha256"] == mask_info["manifest_sha256"]
    assert info["protocol"]["box_rule"] == "connected components" and "box_rule" not in mask_info["protocol"]



def test_validation_episodes_carry_base_label_and_test_episodes_do_not(dataset, tmp_path):
    """BAM's ensemble suppresses every base class it knows unless the batch names the episode's own (RILFS
    resolution 20): validation on base classes must name it, as training does; test episodes are novel."""
    from fsskern.engine.data import eval_dataset
    val, _ = eval_dataset(load_config(None, baseline_args(dataset, tmp_path, "eval.split=val",
                                                          "data.val_fraction=0.5")), 0)
    test, _ = eval_dataset(load_config(None, baseline_args(dataset, tmp_path)), 0)
    item = val[0]
    assert "base_label" not in test[0] and item["base_label"].shape == item["query_mask"].shape
    assert (item["base_label"][item["query_mask"] == 1] > 0).all()  # the episode's class, in the base space


def test_validation_classes_reach_the_engine_as_novel_classes(dataset, tmp_path):
    """``data.val_classes`` (fold 0: novel 1, 2; base 3-6): validation episodes are all of the held-out class,
    without base_label (novel to the model, as the test's), and training never draws it or an image holding it."""
    from fsskern.engine.data import eval_dataset, train_dataset
    held = ["data.val_fraction=0", "data.val_classes=[5]"]
    val, info = eval_dataset(load_config(None, baseline_args(dataset, tmp_path, "eval.split=val", *held)), 0)
    assert info["classes"] == [5] and all(val.manifest[t].classes == (5,) for t in range(len(val)))
    assert "base_label" not in val[0] and (val[0]["query_mask"] == 1).any()
    train = train_dataset(load_config(None, baseline_args(dataset, tmp_path, *held)))
    episodes = [train.manifest[g] for g in range(40)]
    # image i holds classes 1 + i % 6 and 1 + (i + 2) % 6: every image of 3 holds 1 (a test class) or 5
    assert {c for e in episodes for c in e.classes} == {4, 6}
    assert not any(5 in train.source.load(i)[1] for e in episodes for i in (e.query, *e.supports))
    seen = {int(v) for t in range(6) for v in train[t]["base_label"].unique()} - {255}
    assert seen == {0, 1, 2, 3} or seen == {0, 2, 3}  # base 3, 4, 6 in the base learner's space: 1-3

def test_gallery_draws_best_median_worst_with_the_real_pixels(tmp_path):
    from PIL import Image

    from fsskern.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    from fsskern.engine.visualize import EpisodeGallery
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    pixels = torch.randint(0, 256, (3, 3, 24, 32)).float()
    episodes = [{"query_img": (pixels[i] / 255 - mean) / std, "support_imgs": ((pixels[i] / 255 - mean) / std)[None],
                 "query_mask": torch.zeros(24, 32, dtype=torch.long),
                 "support_masks": torch.zeros(1, 24, 32, dtype=torch.long),
                 "index": torch.tensor(i), "classes": torch.tensor([1 + i % 2])} for i in range(3)]

    def model(batch):
        return {"logits": torch.zeros(1, 2, 24, 32)}
    gallery = EpisodeGallery(["background", "cow", "sheep"], max_side=32)
    for i, iou in enumerate([0.5, 0.9, 0.1]):
        gallery.offer(7, i, iou)
    gallery.render({7: episodes}, model, lambda b: b)
    paths = gallery.write(tmp_path)
    assert [p.name.split("-")[0] for p in paths] == ["bad", "median", "good"]
    assert "episode2-iou10" in paths[0].name and "episode1-iou90" in paths[2].name
    query_tile = np.asarray(Image.open(paths[2]))[16:16 + 24, 36:36 + 32]  # second tile, below its title
    assert np.abs(query_tile.astype(int) - pixels[1].permute(1, 2, 0).numpy().astype(int)).max() <= 1


def test_summarize_prints_parsing_results_without_fb_iou(tmp_path, capsys):
    """python/summarize.py on a few-shot and a parsing metrics.json (POPNet's fb_iou is null)."""
    summarize = load_script(ROOT / "python" / "summarize.py")
    paths = []
    for name, fb in (("fss", 70.0), ("parsing", None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({
            "config": {"data": {"fold": 0, "shots": 1}}, "miou": 60.0, "miou_std": 0.5, "fb_iou": fb,
            "fb_iou_std": None if fb is None else 0.1, "episodes": 4, "seeds": [0], "manifest_sha256": ["ab" * 8]}))
        paths.append(str(tmp_path / name / "metrics.json"))
    assert summarize.main(paths) == 0
    out = capsys.readouterr().out
    assert "| 60.0 ± 0.5 | - |" in out and "| **mean** | | | **60.0** | **70.0** | | |" in out
