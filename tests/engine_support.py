"""Test fixtures for the engine: a synthetic labelled folder on disk and a small trainable model.

The model is a real few-shot segmenter in miniature (a two-layer conv encoder, PANet-style fg/bg
prototypes through the ops backend, cosine logits, cross-entropy on the query) with dropout, so the
engine's RNG handling is exercised; it is registered as ``tiny_panet`` when this module is imported
(subprocesses import it through PYTHONPATH).
"""
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from fsskern.models import register_model
from fsskern.models.blocks import cosine_logits

CLASSES = ["background", "red", "green", "blue", "yellow", "cyan", "magenta"]
COLOURS = {1: (220, 40, 40), 2: (40, 200, 40), 3: (40, 40, 220), 4: (220, 220, 40), 5: (40, 210, 210),
           6: (210, 40, 210)}


def make_folder_dataset(root: Path, images: int = 24, size=(96, 128), seed: int = 0) -> Path:
    """``images`` photos of two coloured rectangles (one per half) on a noisy background; label = the
    colour's class. Every class appears in ``images // 3`` images, always with >= 2,304 pixels (the
    2*32*32 rule keeps it)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    H, W = size
    for i in range(images):
        img = rng.integers(60, 140, (H, W, 3), dtype=np.uint8)
        lab = np.zeros((H, W), np.uint8)
        for half, c in enumerate((1 + i % 6, 1 + (i + 2) % 6)):
            h, w = rng.integers(48, 64), rng.integers(48, 64)
            y, x = rng.integers(0, H - h + 1), half * W // 2 + rng.integers(0, W // 2 - w + 1)
            img[y:y + h, x:x + w] = COLOURS[c]
            lab[y:y + h, x:x + w] = c
        lab[0, :4] = 255  # a few ignore pixels
        Image.fromarray(img).save(root / "images" / f"{i:03d}.png")
        Image.fromarray(lab).save(root / "labels" / f"{i:03d}.png")
    (root / "classes.tsv").write_text("".join(f"{i}\t{n}\n" for i, n in enumerate(CLASSES)))
    return root


def data_overrides(root: Path) -> list:
    """Config overrides that point the folder source at ``root`` with two folds."""
    return [f"data.root={root}", "data.dataset=folder", "data.classes=classes.tsv", "data.folds=[[1,2],[3,4]]",
            "data.train_size=33", "data.test_size=33", "data.train_policy=bam"]


@register_model("tiny_panet")
class TinyPANet(nn.Module):
    def __init__(self, cfg, backend):
        super().__init__()
        self.backend = backend
        dropout = (cfg.params or {}).get("dropout", 0.1)
        self.encoder = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Dropout2d(dropout),
                                     nn.Conv2d(16, 16, 3, 1, 1))

    def forward(self, batch):
        q, s, m = batch["query_img"], batch["support_imgs"], batch["support_masks"]
        B, S = m.shape[:2]
        fq, fs = self.encoder(q), self.encoder(s.flatten(0, 1))
        masks = torch.stack([m == 0, m == 1], 2).flatten(0, 1)
        protos = self.backend.masked_average_pool(fs, masks, resize="features").view(B, S, 2, -1).mean(1)
        logits = F.interpolate(cosine_logits(fq, protos), size=q.shape[-2:], mode="bilinear", align_corners=True)
        losses = {}
        if self.training:  # the mean over episodes of each episode's mean: a DDP average of ranks equals it
            ce = F.cross_entropy(logits, batch["query_mask"], ignore_index=255, reduction="none")
            valid = (batch["query_mask"] != 255).flatten(1)
            losses["ce"] = (ce.flatten(1).sum(1) / valid.sum(1).clamp(min=1)).mean()
        return {"logits": logits, "losses": losses}
