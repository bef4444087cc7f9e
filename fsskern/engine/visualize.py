"""Episode overlays: support with its mask, query, ground truth, prediction and the episode's IoU,
for the best, median and worst episodes of an evaluation (PNG files and TensorBoard images).

The gallery keeps only each episode's IoU while evaluating; the three episodes it shows are loaded and
predicted again at the end, so evaluating thousands of episodes costs no memory.
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
    """Keeps every evaluated episode's IoU (a few bytes each) and, once the evaluation is over, draws the
    best, median and worst of them by loading and predicting those three episodes again."""

    def __init__(self, class_names: List[str] = (), max_side: int = 240):
        self.class_names = list(class_names)
        self.max_side = max_side
        self.scores = []  # (iou, seed, episode index)
        self.panels = []  # (kind, iou, seed, index, PIL image)

    def offer(self, seed: int, index: int, iou: float) -> None:
        self.scores.append((iou, seed, index))

    def picks(self):
        """[(kind, (iou, seed, index))] for the worst, median and best episodes."""
        if not self.scores:
            return []
        ranked = sorted(self.scores)
        return [("bad", ranked[0]), ("median", ranked[len(ranked) // 2]), ("good", ranked[-1])]

    @torch.no_grad()
    def render(self, datasets: dict, model, prepare) -> None:
        """Draw the picks: ``datasets[seed]`` gives episode ``index``; ``prepare(batch)`` moves it to the
        model's device."""
        from ..data.loader import collate_episodes
        for kind, (iou, seed, index) in self.picks():
            batch = prepare(collate_episodes([datasets[seed][index]]))
            pred = model(batch)["logits"][0].argmax(0)
            self.panels.append((kind, iou, seed, index, self._panel(batch, pred, iou)))

    def _panel(self, batch: dict, pred: torch.Tensor, iou: float) -> Image.Image:
        h, w = batch["query_img"].shape[-2:]
        scale = self.max_side / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))

        def small(x, mode):
            x = x.cpu().float()
            y = F.interpolate(x[None] if x.dim() == 3 else x[None, None], size=size, mode=mode)
            return y[0] if x.dim() == 3 else y[0, 0].long()
        cls = int(batch["classes"][0, 0])
        name = self.class_names[cls] if cls < len(self.class_names) and self.class_names[cls] else str(cls)
        return episode_panel(small(batch["support_imgs"][0, 0], "bilinear"),
                             small(batch["support_masks"][0, 0], "nearest"), small(batch["query_img"][0], "bilinear"),
                             small(batch["query_mask"][0], "nearest"), small(pred, "nearest"), iou, name)

    def write(self, folder: Path, writer=None, step: int = 0) -> List[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for kind, iou, seed, index, panel in self.panels:
            path = folder / f"{kind}-seed{seed}-episode{index}-iou{100 * iou:.0f}.png"
            panel.save(path)
            paths.append(path)
            if writer is not None:
                writer.add_image(f"episodes/{kind}", np.asarray(panel), step, dataformats="HWC")
        return paths
