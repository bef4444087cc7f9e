"""Few-shot segmentation and one-shot parsing metrics.

Few-shot (PFENet / BAM / HSNet convention, engine-anchors c6): every episode contributes its
intersection and union per label (0 = background, k = the k-th way); a class's IoU is
sum(I) / sum(U) over the episodes of that class, mIoU the mean over the evaluated classes, FB-IoU the
mean over {bg, fg} of the IoUs of the counts summed over all episodes. `FewShotMeter` keeps one row
per (episode, way) so every variant can be recomputed offline, and merges across ranks.

Parsing (POPNet, ../shared/notes/methods/popnet.md section 5.2 and 8.7): one confusion matrix
accumulated over all test pairs, per-class IoU from it, nanmean over a class list.
All percentages are in [0, 100].
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

IGNORE_INDEX = 255
# Row layout of FewShotMeter: one row per (episode, way).
ROW_FIELDS = ("class", "i_fg", "u_fg", "i_bg", "u_bg", "index", "way")


def episode_iou_counts(pred: torch.Tensor, label: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                       num_classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label intersection and union of one or many episodes.

    pred, label: (..., H, W) integer maps (pred in 0..num_classes-1; label may also hold ignore_index,
    whose pixels count nowhere). Returns (inter, union), each int64 (..., num_classes); column 0 is the
    background, column k the k-th way.
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    valid = label != ignore_index
    batch = pred.shape[:-2]
    inter = torch.empty(*batch, num_classes, dtype=torch.int64, device=pred.device)
    union = torch.empty_like(inter)
    for c in range(num_classes):
        p, t = (pred == c) & valid, (label == c) & valid
        inter[..., c] = (p & t).sum(dim=(-2, -1))
        union[..., c] = (p | t).sum(dim=(-2, -1))
    return inter, union


class FewShotMeter:
    """Accumulates per-episode (I, U) and summarises them.

    classes: the class ids to be evaluated (the fold's novel classes). A class never sampled scores 0
    in mIoU (as BAM and HSNet do) and is listed under `unsampled` with a warning; a class with fewer
    than `min_episodes` episodes is listed under `low_coverage` with a warning.
    """

    def __init__(self, classes: Sequence[int], min_episodes: int = 0):
        self.classes = [int(c) for c in classes]
        self.min_episodes = int(min_episodes)
        self._rows: list[torch.Tensor] = []

    def update(self, class_ids, inter: torch.Tensor, union: torch.Tensor, episode_index) -> None:
        """class_ids (B,) or (B, ways); inter, union (B, ways + 1) as `episode_iou_counts` returns them;
        episode_index (B,) the episodes' indices in the manifest (used to merge and de-duplicate)."""
        inter, union = torch.as_tensor(inter).cpu().long(), torch.as_tensor(union).cpu().long()
        class_ids = torch.as_tensor(class_ids).cpu().long().reshape(inter.shape[0], -1)
        index = torch.as_tensor(episode_index).cpu().long().reshape(-1)
        ways = class_ids.shape[1]
        if inter.shape != (index.numel(), ways + 1) or union.shape != inter.shape:
            raise ValueError(f"inter/union {tuple(inter.shape)} do not match {index.numel()} episodes x "
                             f"({ways} ways + bg)")
        way = torch.arange(ways).expand(index.numel(), ways)
        rows = torch.stack([class_ids, inter[:, 1:], union[:, 1:],
                            inter[:, :1].expand(-1, ways), union[:, :1].expand(-1, ways),
                            index[:, None].expand(-1, ways), way], dim=-1)
        self._rows.append(rows.reshape(-1, len(ROW_FIELDS)))

    @property
    def rows(self) -> torch.Tensor:
        """(N, 7) int64 rows, columns ROW_FIELDS, sorted by (index, way)."""
        if not self._rows:
            return torch.zeros(0, len(ROW_FIELDS), dtype=torch.int64)
        rows = torch.cat(self._rows)
        self._rows = [rows]
        return rows

    def state(self) -> dict:
        return {"classes": list(self.classes), "rows": self.rows.clone()}

    def merge(self, state: dict) -> None:
        """Add another meter's rows (from `state()`). Rows of the same (episode, way) seen twice (e.g.
        a DistributedSampler padding the last batch with repeated episodes) are kept once; they must be
        identical, else it raises."""
        if list(state["classes"]) != self.classes:
            raise ValueError(f"cannot merge meters of different classes: {state['classes']} vs {self.classes}")
        rows = torch.cat([self.rows, torch.as_tensor(state["rows"]).long()])
        self._rows = [_unique_episodes(rows)]

    def all_reduce(self) -> None:
        """Gather every rank's rows onto every rank (torch.distributed, any backend incl. gloo). A no-op
        without an initialised process group."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self._rows = [_unique_episodes(self.rows)]
            return
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.rows)
        self._rows = [_unique_episodes(torch.cat(gathered))]

    def summary(self) -> dict:
        """miou, fb_iou (percent), per_class {class: IoU %}, episode_miou (NON-STANDARD: mean over the
        evaluated classes of the mean per-episode foreground IoU, episodes with an empty union skipped),
        coverage {class: episodes}, unsampled, low_coverage, episodes."""
        rows = _unique_episodes(self.rows)
        cls = rows[:, 0]
        per_class, episode_iou, coverage = {}, {}, {}
        for c in self.classes:
            sel = rows[cls == c]
            coverage[c] = int(sel.shape[0])
            i, u = int(sel[:, 1].sum()), int(sel[:, 2].sum())
            per_class[c] = 100.0 * i / u if u > 0 else 0.0  # BAM: 0 / (0 + 1e-10)
            nonempty = sel[sel[:, 2] > 0]
            episode_iou[c] = float((nonempty[:, 1] / nonempty[:, 2]).mean()) * 100 if len(nonempty) else 0.0
        unsampled = [c for c in self.classes if coverage[c] == 0]
        low = [c for c in self.classes if 0 < coverage[c] < self.min_episodes]
        if unsampled:
            warnings.warn(f"classes never sampled (scored 0 in mIoU): {unsampled}", stacklevel=2)
        if low:
            warnings.warn(f"classes with fewer than {self.min_episodes} episodes: "
                          f"{ {c: coverage[c] for c in low} }", stacklevel=2)
        # FB-IoU: background counts once per episode (they repeat on every way's row), foreground pooled
        # over all ways' rows; for 1-way this is exactly PFENet/HSNet's FB-IoU.
        in_classes = torch.isin(cls, torch.tensor(self.classes, dtype=torch.int64))
        scored = rows[in_classes]
        bg = scored[scored[:, 6] == 0]
        fb = [_ratio(bg[:, 3].sum(), bg[:, 4].sum()), _ratio(scored[:, 1].sum(), scored[:, 2].sum())]
        n = len(self.classes)
        return {
            "miou": sum(per_class.values()) / n if n else 0.0,
            "fb_iou": 100.0 * sum(fb) / 2,
            "per_class": per_class,
            "episode_miou": sum(episode_iou.values()) / n if n else 0.0,
            "coverage": coverage,
            "unsampled": unsampled,
            "low_coverage": low,
            "episodes": int(torch.unique(scored[:, 5]).numel()),
        }

    def to_json(self, path=None, **metadata) -> str:
        """Summary, the rows (columns ROW_FIELDS) and any metadata (protocol, manifest sha256, seed...)
        as one JSON document; written to `path` when given."""
        doc = {**metadata, "summary": self.summary(), "row_fields": list(ROW_FIELDS),
               "rows": self.rows.tolist()}
        text = json.dumps(doc, indent=None, sort_keys=False, default=_json_default)
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text


def _json_default(obj):
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _ratio(i, u) -> float:
    return float(i) / float(u) if int(u) > 0 else 0.0


def _unique_episodes(rows: torch.Tensor) -> torch.Tensor:
    """Rows sorted by (index, way), duplicates of one (index, way) dropped after checking they agree."""
    if rows.numel() == 0:
        return rows
    keys = rows[:, 5] * (int(rows[:, 6].max()) + 1) + rows[:, 6]
    order = torch.argsort(keys, stable=True)
    rows, keys = rows[order], keys[order]
    first = torch.ones_like(keys, dtype=torch.bool)
    first[1:] = keys[1:] != keys[:-1]
    kept = rows[first]
    # every duplicate must equal the first row of its key
    group = torch.cumsum(first.long(), 0) - 1
    if not torch.equal(rows, kept[group]):
        raise ValueError("the same episode was recorded twice with different counts")
    return kept


def seed_statistics(summaries: Sequence[dict]) -> dict:
    """Mean and standard deviation over seeds of miou, fb_iou, episode_miou and each class's IoU.

    The standard deviation is the population one (ddof = 0), as PANet reports it with np.std; say so
    when comparing with a sample std. Returns {"miou": {"mean", "std"}, "fb_iou": ..., "episode_miou":
    ..., "per_class": {c: {"mean", "std"}}, "seeds": n, "per_seed": [summaries]}.
    """
    if not summaries:
        raise ValueError("seed_statistics needs at least one summary")

    def stat(values):
        a = np.asarray(values, dtype=np.float64)
        return {"mean": float(a.mean()), "std": float(a.std(ddof=0))}

    out = {key: stat([s[key] for s in summaries]) for key in ("miou", "fb_iou", "episode_miou")}
    out["per_class"] = {c: stat([s["per_class"][c] for s in summaries]) for c in summaries[0]["per_class"]}
    out["seeds"] = len(summaries)
    out["std_kind"] = "population (ddof=0)"
    out["per_seed"] = list(summaries)
    return out


class ConfusionMatrix:
    """Parsing confusion matrix (POPNet `fast_hist` / `get_iou_from_list`, popnet.md 5.2 and 8.7).

    Rows are ground truth, columns predictions; pixels whose label is outside 0..num_classes-1 (255)
    are excluded. IoU_c = M[c, c] / (sum_row_c + sum_col_c - M[c, c]); a class with an empty union is NaN
    and left out of the means (np.nanmean, as POPNet).
    """

    def __init__(self, num_classes: int):
        self.num_classes = int(num_classes)
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, label: torch.Tensor) -> None:
        """pred, label: integer maps of the same shape (any batch dims)."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
        n = self.num_classes
        label, pred = label.reshape(-1).long(), pred.reshape(-1).long()
        valid = (label >= 0) & (label < n)
        if bool(((pred[valid] < 0) | (pred[valid] >= n)).any()):
            raise ValueError(f"predictions outside 0..{n - 1}")
        counts = torch.bincount(label[valid] * n + pred[valid], minlength=n * n)
        self.matrix += counts.reshape(n, n).cpu()

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix

    def all_reduce(self) -> None:
        """Sum the matrices of every rank (no-op without an initialised process group)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix)

    def iou(self) -> np.ndarray:
        """(num_classes,) float64 IoU in [0, 1], NaN where the union is empty."""
        m = self.matrix.double().numpy()
        inter = np.diag(m)
        union = m.sum(0) + m.sum(1) - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(union > 0, inter / union, np.nan)

    def miou(self, classes: Iterable[int] | None = None) -> float:
        """nanmean of the IoUs over `classes` (all classes, background included, when None), percent."""
        iou = self.iou()
        sel = iou if classes is None else iou[list(classes)]
        return float(np.nanmean(sel)) * 100 if np.isfinite(sel).any() else float("nan")

    def pixel_accuracy(self) -> float:
        """Overall pixel accuracy (POPNet's "Overall Acc"), percent."""
        total = int(self.matrix.sum())
        return 100.0 * int(self.matrix.diag().sum()) / total if total else float("nan")

    def parsing_summary(self, novel: Sequence[int]) -> dict:
        """POPNet k-way report (popnet.md 5.2): human mIoU over every class incl. background, novel mIoU
        over `novel`, base mIoU over the rest (incl. background), overall pixel accuracy, per-class IoU, and
        the matrix itself (rows truth, columns prediction): where a class's pixels go, background included."""
        novel = [int(c) for c in novel]
        base = [c for c in range(self.num_classes) if c not in novel]
        return {"human_miou": self.miou(), "novel_miou": self.miou(novel), "base_miou": self.miou(base),
                "pixel_accuracy": self.pixel_accuracy(), "per_class": (self.iou() * 100).tolist(),
                "confusion": self.matrix.tolist()}


def one_way_parsing_summary(per_class: dict[int, ConfusionMatrix], novel: Sequence[int]) -> dict:
    """POPNet one-way report (popnet.md 5.2). `per_class[c]` is the 2x2 matrix (0 bg, 1 = class c)
    accumulated over class c's episodes.

    - class c's IoU: the foreground IoU of its matrix;
    - human mIoU: mean over len(per_class) + 1 entries, the per-class foreground IoUs and one
      background entry, the background IoU averaged over the classes;
    - novel mIoU: mean foreground IoU over `novel`; a novel class no episode evaluated (POPNet's pairs can leave
      one without a query, and eval.episodes can cut the list) scores 0 with a warning, as never-sampled classes
      do in the FSS mIoU;
    - Bi-IoU: mean of the background and foreground IoUs of the matrices summed over all classes
      (every evaluated class counted as foreground); POPNet's code samples every 10th pair for it,
      here every pair counts.
    """
    if not per_class:
        raise ValueError("one_way_parsing_summary needs at least one class")
    ious = {c: m.iou() for c, m in per_class.items()}
    fg = {c: iou[1] for c, iou in ious.items()}
    bg_mean = np.nanmean([iou[0] for iou in ious.values()])
    total = ConfusionMatrix(2)
    for m in per_class.values():
        total.merge(m)
    missing = [c for c in novel if c not in fg]
    if missing:
        warnings.warn(f"novel classes never evaluated (scored 0 in the novel mIoU): {missing}", stacklevel=2)
    return {"human_miou": float(np.nanmean([bg_mean, *fg.values()])) * 100,
            # a class scored with an empty union counts 0 as a missing one does (as FewShotMeter), not left out
            "novel_miou": float(np.mean(np.nan_to_num([fg.get(c, 0.0) for c in novel], nan=0.0))) * 100,
            "bi_iou": total.miou(),
            "per_class": {c: float(v) * 100 for c, v in fg.items()},
            "background_iou": float(bg_mean) * 100}
