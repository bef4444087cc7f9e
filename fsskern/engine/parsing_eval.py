"""POPNet's parsing evaluation (notes/methods/popnet.md 5.2): one confusion matrix over every test pair in
dataset class ids, instead of the per-way fg/bg counts of ``FewShotMeter``.

k-way (``data.ways`` > 1): human mIoU over every class incl. background, novel and base mIoU, overall pixel
accuracy (``ConfusionMatrix.parsing_summary``). One-way: one 2 x 2 matrix per class, Bi-IoU and the one-way
human mIoU (``one_way_parsing_summary``). Predictions and labels are mapped from way ids (channel / label w =
the episode's w-th class) to dataset ids, so episodes with different way lists add into one matrix. Scored at
the original label resolution (``restore_logits``) or the input size, as the protocol says.
"""
import torch

from ..metrics import ConfusionMatrix, one_way_parsing_summary
from . import distributed as dist
from .config import Config
from .data import eval_dataset
from .evaluator import scored_episodes

IGNORE = 255


def way_to_class(ids: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Way ids (0 bg, w = classes[w - 1], 255 kept) -> dataset class ids."""
    lut = torch.cat([classes.new_zeros(1), classes])
    return torch.where(ids == IGNORE, IGNORE, lut[ids.clamp(max=len(classes))])


@torch.no_grad()
def evaluate_parsing(cfg: Config, model, num_classes: int, progress: bool = False) -> dict:
    """Evaluate ``model`` on ``cfg.eval`` (every seed of ``eval.seeds``) with POPNet's metrics.

    ``num_classes``: the dataset's label space (``len(source.class_names)``). Returns {"per_seed": [summary
    per seed]}, each summary holding human_miou, novel_miou, base_miou, pixel_accuracy, per_class and the
    pixel counts of the confusion matrix (k-way), or human_miou, novel_miou, bi_iou, per_class, background_iou
    (one-way); the scores in percent."""
    from .trainer import device_of  # the trainer imports the evaluator
    device = device_of(cfg)
    was_training = model.training
    model.eval()
    try:  # a caller that catches an evaluation error (a validation) gets its training mode back
        per_seed = []
        for seed in cfg.eval.seeds:
            dataset, info = eval_dataset(cfg, seed)
            novel = info["classes"]
            kway = cfg.data.ways > 1
            total = ConfusionMatrix(num_classes)
            per_class = {}
            for batch, b, logits, label in scored_episodes(cfg, model, dataset, seed, device, progress):
                pred = logits.argmax(0)
                if kway:
                    classes = batch["classes"][b]
                    total.update(way_to_class(pred, classes), way_to_class(label, classes))
                else:
                    c = int(batch["classes"][b, 0])
                    per_class.setdefault(c, ConfusionMatrix(2)).update(pred, label)
            if kway:
                total.all_reduce()
                summary = total.parsing_summary(novel)
            else:
                # every rank reduces the same classes in the same order: its shard may lack some of them
                for c in sorted({c for rank in dist.all_gather_objects(sorted(per_class)) for c in rank}):
                    per_class.setdefault(c, ConfusionMatrix(2)).all_reduce()
                summary = one_way_parsing_summary(per_class, novel)
            per_seed.append({"seed": seed, "protocol": info["protocol"], "manifest_sha256": info["manifest_sha256"],
                             "episodes": len(dataset), **summary})
    finally:
        model.train(was_training)
    return {"per_seed": per_seed}
