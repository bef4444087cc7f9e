"""POPNet's parsing evaluation (notes/methods/popnet.md 5.2): one confusion matrix over every test pair in
dataset class ids, instead of the per-way fg/bg counts of ``FewShotMeter``.

k-way (``data.ways`` > 1): human mIoU over every class incl. background, novel and base mIoU, overall pixel
accuracy (``ConfusionMatrix.parsing_summary``). One-way: one 2 x 2 matrix per class, Bi-IoU and the one-way
human mIoU (``one_way_parsing_summary``). Predictions and labels are mapped from way ids (channel / label w =
the episode's w-th class) to dataset ids, so episodes with different way lists add into one matrix. Scored at
the original label resolution (``restore_logits``) or the input size, as the protocol says.
"""
import torch

from ..data.transforms import restore_logits
from ..metrics import ConfusionMatrix, one_way_parsing_summary
from . import distributed as dist
from .config import Config
from .data import episode_loader, eval_dataset

IGNORE = 255


def way_to_class(ids: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Way ids (0 bg, w = classes[w - 1], 255 kept) -> dataset class ids."""
    lut = torch.cat([classes.new_zeros(1), classes])
    return torch.where(ids == IGNORE, IGNORE, lut[ids.clamp(max=len(classes))])


@torch.no_grad()
def evaluate_parsing(cfg: Config, model, num_classes: int, progress: bool = False) -> dict:
    """Evaluate ``model`` on ``cfg.eval`` (every seed of ``eval.seeds``) with POPNet's metrics.

    ``num_classes``: the dataset's label space (``len(source.class_names)``). Returns {"per_seed": [summary
    per seed]}, each summary holding human_miou, novel_miou, base_miou, pixel_accuracy, per_class (k-way)
    or human_miou, novel_miou, bi_iou, per_class, background_iou (one-way), all in percent."""
    from .trainer import autocast, device_of, to_device  # the trainer imports the evaluator
    device = device_of(cfg)
    was_training = model.training
    model.eval()
    per_seed = []
    for seed in cfg.eval.seeds:
        dataset, info = eval_dataset(cfg, seed)
        novel = info["classes"]
        shard = list(range(dist.rank(), len(dataset), dist.world_size()))
        loader = episode_loader(dataset, shard, cfg.eval.batch_size, cfg.data.num_workers, seed=seed)
        kway = cfg.data.ways > 1
        total = ConfusionMatrix(num_classes)
        per_class = {}
        for batch in loader:
            batch = to_device(batch, device)
            with autocast(cfg, device):
                logits = model(batch)["logits"].float()
            for b in range(logits.shape[0]):
                restore = batch["restore"][b]
                pred = restore_logits(logits[b], restore).argmax(0)
                label = batch["query_mask"][b] if restore["score_at"] == "input" else batch["query_label_orig"][b]
                label = label.to(device)
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
            for c in sorted(per_class):
                per_class[c].all_reduce()
            summary = one_way_parsing_summary(per_class, novel)
        per_seed.append({"seed": seed, "protocol": info["protocol"], "manifest_sha256": info["manifest_sha256"],
                         **summary})
    model.train(was_training)
    return {"per_seed": per_seed}
