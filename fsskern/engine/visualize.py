"""Episode overlays: support with its mask, query, ground truth, prediction and the episode's IoU,
for the best, median and worst episodes of an evaluation (PNG files and TensorBoard images).

The gallery keeps a thumbnail (longer side ``max_side``) of each episode it might show, so
evaluating thousands of episodes costs little memory.
"""
from pathlib import Path
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..data.transforms import denormalize

FG = np.array([255, 64, 32], dtype=np.float32)    # foreground overlay (prediction, ground truth, support mask)
IGNORE = np.array([128, 128, 128], dtype=np.float32)


def _rgb(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) normalised -> (H, W, 3) uint8."""
    return denormalize(img.float().cpu()).permute(1, 2, 0).numpy()


def overlay(rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    out = rgb.astype(np.float32)
    fg, ign = mask == 1, mask == 255
    out[fg] = (1 - alpha) * out[fg] + alpha * FG
    out[ign] = (1 - alpha) * out[ign] + alpha * IGNORE
    return out.astype(np.uint8)


def _titled(img: np.ndarray, title: str) -> Image.Image:
    tile = Image.new("RGB", (img.shape[1], img.shape[0] + 16), "white")
    tile.paste(Image.fromarray(img), (0, 16))
    ImageDraw.Draw(tile).text((2, 2), title, fill="black")
    return tile


def episode_panel(support: torch.Tensor, support_mask: torch.Tensor, query: torch.Tensor, label: torch.Tensor,
                  pred: torch.Tensor, iou: float, name: str) -> Image.Image:
    """One row: support + mask | query | query + ground truth | query + prediction (IoU in the title).
    Tensors at the network input resolution; label/pred (H, W) with 0/1/255."""
    q = _rgb(query)
    tiles = [_titled(overlay(_rgb(support), support_mask.cpu().numpy()), f"support: {name}"),
             _titled(q, "query"), _titled(overlay(q, label.cpu().numpy()), "ground truth"),
             _titled(overlay(q, pred.cpu().numpy()), f"prediction IoU {100 * iou:.1f}")]
    panel = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), max(t.height for t in tiles)),
                      "white")
    x = 0
    for t in tiles:
        panel.paste(t, (x, 0))
        x += t.width + 4
    return panel


class EpisodeGallery:
    """Collects every evaluated 1-way episode (small copies) and draws the best, median and worst."""

    def __init__(self, class_names: List[str] = (), max_side: int = 240):
        self.class_names = list(class_names)
        self.max_side = max_side
        self.items = []  # (iou, seed, index, small tensors)

    def offer(self, seed: int, batch: dict, b: int, pred: torch.Tensor, iou: float) -> None:
        """Episode ``b`` of ``batch`` with its prediction at the input resolution (H, W) and its IoU."""
        h, w = batch["query_img"].shape[-2:]
        scale = self.max_side / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))

        def small(x, mode):
            x = x.cpu().float()
            y = F.interpolate(x[None] if x.dim() == 3 else x[None, None], size=size, mode=mode)
            return y[0] if x.dim() == 3 else y[0, 0].long()
        self.items.append((iou, seed, int(batch["index"][b]), int(batch["classes"][b, 0]),
                           small(batch["support_imgs"][b, 0], "bilinear"), small(batch["support_masks"][b, 0], "nearest"),
                           small(batch["query_img"][b], "bilinear"), small(batch["query_mask"][b], "nearest"),
                           small(pred, "nearest")))

    def picks(self):
        """The best, median and worst episodes by IoU."""
        if not self.items:
            return []
        ranked = sorted(self.items, key=lambda it: (it[0], it[1], it[2]))
        return [("bad", ranked[0]), ("median", ranked[len(ranked) // 2]), ("good", ranked[-1])]

    def write(self, folder: Path, writer=None, step: int = 0) -> List[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for kind, (iou, seed, index, cls, s, sm, q, ql, qp) in self.picks():
            name = self.class_names[cls] if cls < len(self.class_names) else str(cls)
            panel = episode_panel(s, sm, q, ql, qp, iou, name)
            path = folder / f"{kind}-seed{seed}-episode{index}-iou{100 * iou:.0f}.png"
            panel.save(path)
            paths.append(path)
            if writer is not None:
                writer.add_image(f"episodes/{kind}", np.asarray(panel), step, dataformats="HWC")
        return paths
