"""Real episodes for the methods' over-fitting tests, and their two-process training runs, written once."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fsskern.data import build_source
from fsskern.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from fsskern.engine.config import config_from_dict, read_yaml

REPO = Path(__file__).resolve().parents[1]
MSRC = REPO.parent / "shared" / "data" / "msrc_v2"
COW_SHEEP = (("1_13_s", "1_11_s", 4), ("1_26_s", "1_27_s", 6))  # (query, support, class)


def msrc_episodes(episodes=COW_SHEEP, size: int = 97) -> dict:
    """Real MSRC-v2 1-way 1-shot episodes as one batch, loaded by the dataset source of
    configs/data/msrc_v2.yaml: label == class -> 1, void -> 255, other classes -> 0, resized to size x size."""
    tree = read_yaml(REPO / "configs" / "data" / "msrc_v2.yaml")
    tree["data"]["root"] = str(MSRC)
    source = build_source(config_from_dict(tree).data, "train")
    ids = {source.sample_id(i): i for i in range(len(source))}
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def load(name, cls):
        image, label = source.load(ids[name])
        image = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        image = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)[0]
        label = F.interpolate(torch.from_numpy(label)[None, None].float(), size=(size, size), mode="nearest")[0, 0]
        return (image - mean) / std, torch.where(label == 255, 255, (label == cls).long())

    q = [load(qn, c) for qn, _, c in episodes]
    s = [load(sn, c) for _, sn, c in episodes]
    return {"query_img": torch.stack([i for i, _ in q]), "query_mask": torch.stack([m for _, m in q]),
            "support_imgs": torch.stack([i for i, _ in s])[:, None],
            "support_masks": torch.stack([m for _, m in s])[:, None],
            "classes": torch.tensor([[c] for *_, c in episodes]), "index": torch.arange(len(episodes))}


def assert_refuses_label_maps(model, batch: dict) -> None:
    """A 1-way model in training refuses masks of class ids (blocks.check_one_way_batch): as supports they would
    read as no foreground, as the query's target an index out of range (on CUDA a device-side assert)."""
    with pytest.raises(ValueError, match=r"support_masks must hold 0\.\.1 or 255; found \[7"):
        model(dict(batch, support_masks=batch["support_masks"] * 7))
    with pytest.raises(ValueError, match=r"query_mask must hold 0\.\.1 or 255; found \[7"):
        model(dict(batch, query_mask=batch["query_mask"] * 7))


def pooled_foreground_iou(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Query foreground IoU pooled over the batch (void pixels count only where they are foreground: never)."""
    pred, fg = logits.argmax(1) == 1, mask == 1
    return float((pred & fg).sum() / ((pred & (mask != 255)) | fg).sum())


def fit_until(model, batch, lr: float, steps: int, every: int, target: float = 0.9, score=pooled_foreground_iou,
              loss=lambda losses: sum(losses.values())):
    """Adam on one batch until ``score(eval logits, query_mask) >= target``, checked every ``every`` steps.
    Returns (score, steps taken) for the test's assertion and message."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        model.train()
        value = loss(model(batch)["losses"])
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        if step % every == every - 1:
            with torch.no_grad():
                reached = score(model.eval()(batch)["logits"], batch["query_mask"])
            if reached >= target:
                break
    return reached, step + 1


class OpInputDtypes(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the floating dtypes of the tensors each public fsskern op reads (after autocast's casts)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fsskern" and not func.name().split("::")[1].startswith("_"):
            floats = {a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()}
            self.calls.append((func.name().split("::")[1], floats))
        return func(*args, **(kwargs or {}))

    def assert_read_in(self, dtype, op_names, keep_float32=("lsh_hash",)):
        """Every call of op_names read dtype (lsh_hash's planes stay float32): no float32 copy of a feature map."""
        reads = [(op, floats) for op, floats in self.calls if op in op_names]
        assert {op for op, _ in reads} == set(op_names), self.calls
        for op, floats in reads:
            allowed = {dtype, torch.float32} if op in keep_float32 else {dtype}
            assert dtype in floats and floats <= allowed, (op, floats)


def train_two_gloo_ranks(config: str, port: int, *overrides: str) -> subprocess.CompletedProcess:
    """python/train.py CONFIG under torchrun with two gloo processes (one thread each)."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           str(REPO / "python" / "train.py"), str(REPO / config), *overrides],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
