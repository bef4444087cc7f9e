"""What a run leaves behind: the resolved config and its provenance, metrics as JSON lines and
TensorBoard scalars/images, and a tqdm bar with ETA (rank 0 only)."""
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

from .. import __version__
from .checkpoint import write_atomic
from .config import Config, config_hash, dump_yaml, to_dict


def git_commit(root: Path = Path(__file__).resolve().parents[2]) -> str:
    """The commit (with -dirty) of the fsskern checkout at ``root``; "unknown" for an installed copy, whose
    parents are site-packages, maybe inside the user's own repository, whose commit says nothing about fsskern."""
    if not ((root / ".git").exists() and (root / "csrc").is_dir()):
        return "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit + ("-dirty" if dirty else "")) if commit else "unknown"


def write_run_info(cfg: Config, out: Path, **extra) -> None:
    """Freeze the resolved config and its provenance into the run folder."""
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", lambda f: f.write(dump_yaml(to_dict(cfg)).encode()))  # resumes read both
    info = {"fsskern": __version__, "git_commit": git_commit(), "config_sha256": config_hash(cfg), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **extra}
    path = out / "run.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if old.get("git_commit", info["git_commit"]) != info["git_commit"]:  # a resume on other code: keep both
        info["earlier_commits"] = old.get("earlier_commits", []) + [old["git_commit"]]
    write_atomic(path, lambda f: f.write(json.dumps({**old, **info}, indent=1).encode()))


def tensorboard_writer(out: Path, purge_step: Optional[int] = None):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a requirement, but a missing sink must not stop a run
        return None
    return SummaryWriter(str(out / "tb"), purge_step=purge_step)


def row_of(line: str) -> Optional[dict]:
    """A metrics.jsonl row, None for a blank line or one a kill cut short."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


def trim_rows(path: Path, last_iteration: int) -> None:
    """Drop the rows of ``path`` (metrics.jsonl) past ``last_iteration``: a run resumed from its checkpoint at
    that iteration logs the later ones again."""
    if not path.is_file():
        return
    rows = path.read_text().splitlines(keepends=True)
    kept = [r for r in rows if (parsed := row_of(r)) is not None and parsed.get("iteration", 0) <= last_iteration]
    if len(kept) != len(rows):
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


class RunLogger:
    """metrics.jsonl + TensorBoard + a progress bar; does nothing on ranks other than 0. Training rows are
    written every ``every`` iterations (and at the last), with the losses and step time averaged over the
    iterations since the previous row (as torchvision's MetricLogger) and each optimizer's LR at the step."""

    def __init__(self, out: Path, total: int, start: int = 0, enabled: bool = True, every: int = 1):
        self.enabled, self.out, self.total, self.every = enabled, out, total, max(1, every)
        if not enabled:
            return
        out.mkdir(parents=True, exist_ok=True)
        trim_rows(out / "metrics.jsonl", start)  # what a crash logged after the checkpoint comes again
        self.jsonl = open(out / "metrics.jsonl", "a")
        self.tb = tensorboard_writer(out, purge_step=start + 1)
        self.bar = tqdm(total=total, initial=start, desc=out.name, dynamic_ncols=True, mininterval=1.0)
        self.window, self.window_seconds, self.window_steps = {}, 0.0, 0

    def step(self, iteration: int, losses: dict, lrs: dict, seconds: float) -> None:
        """``lrs``: {optimizer name: the LR this step used}."""
        if not self.enabled:
            return
        lr_keys = {"lr": next(iter(lrs.values()))} if len(lrs) == 1 else {f"lr_{k}": v for k, v in lrs.items()}
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{sum(losses.values()):.4f}", **{k: f"{v:.2e}" for k, v in lr_keys.items()})
        for k, v in losses.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.window_seconds += seconds
        self.window_steps += 1
        if iteration % self.every and iteration != self.total:
            return
        n = self.window_steps
        means = {k: v / n for k, v in self.window.items()}
        self.scalars(iteration, {"train/loss": sum(means.values()), "train/step_s": self.window_seconds / n,
                                 **{f"train/{k}": v for k, v in {**lr_keys, **means}.items()}})
        self.window, self.window_seconds, self.window_steps = {}, 0.0, 0

    def scalars(self, iteration: int, values: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"iteration": iteration, **values}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            for k, v in values.items():
                if v is not None:  # a metric the model does not have (a parsing model's FB-IoU)
                    self.tb.add_scalar(k, v, iteration)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
