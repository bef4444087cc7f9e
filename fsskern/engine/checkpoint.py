"""Checkpoints that are never half-written and that a resumed run can trust.

Files are written to a temporary name in the same folder, flushed, fsynced and renamed over the
old one (then the folder is fsynced), so ``last.pt`` is always either the previous or the new
checkpoint. Loading checks a format tag, so a truncated file or another program's checkpoint is
refused with a message that says which.
"""
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "fsskern-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    pass


def rng_state(device: torch.device) -> dict:
    """This process's random state: Python's, NumPy's, torch's CPU generator and, on a GPU, that GPU's only
    (a rank's generator; every visible GPU's would not restore on a machine with fewer)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        cuda = state["cuda"]
        if isinstance(cuda, list):  # checkpoints before the per-device state held every visible GPU's
            cuda = cuda[device.index or 0] if len(cuda) > (device.index or 0) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


def write_atomic(path, write) -> None:
    """Call write(f) on a temporary file beside path, then rename it over path: a reader (a resumed run, the
    demo) finds the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide the run's checkpoints from its group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_atomic(payload: dict, path) -> None:
    write_atomic(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **payload}, f))


def load(path) -> dict:
    """Read an fsskern checkpoint; a clear CheckpointError for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        # Our checkpoints hold RNG states (numpy arrays, tuples) besides tensors: weights_only
        # would refuse them. Only load checkpoints you wrote.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for a cut or non-torch file
        raise CheckpointError(f"checkpoint {path} cannot be read (truncated or not a torch file: "
                              f"{type(e).__name__}: {e})") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        keys = sorted(payload)[:10] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not an fsskern checkpoint (found {keys}); to start from other "
                              f"weights use model.weights (backbone weights); each phase of a recipe starts from "
                              f"the previous phase's by itself")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {payload.get('version')}, this fsskern reads {VERSION}")
    return payload
