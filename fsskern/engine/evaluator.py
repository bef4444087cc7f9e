"""Evaluation on an episode manifest: sharded over ranks, per-class counts summed across them,
every seed of ``eval.seeds`` run, mean and std reported with the protocol and manifest hashes.

Logits are mapped back to the original label resolution by the transform's restore rule
(``pfenet``: bilinear to L x L, L the longer original side; ``square``; ``original``) for every
item of a batch (PFENet's own code assumes batch 1 there).
"""
import json
import math
from pathlib import Path
from typing import Optional

import torch

from ..data.transforms import restore_logits
from ..metrics import FewShotMeter, episode_iou_counts, seed_statistics
from . import distributed as dist
from .config import Config, ConfigError, DataConfig, to_dict
from .data import episode_loader, eval_dataset, with_protocol_defaults


@torch.no_grad()
def evaluate_model(cfg: Config, model, progress: bool = True, visualizer=None) -> dict:
    """Evaluate ``model`` on ``cfg.eval`` (split, protocol, episodes, seeds). Every rank calls it."""
    from .trainer import device_of, to_device  # the trainer imports this module
    cfg = with_protocol_defaults(cfg)
    if getattr(model, "metric", "few_shot") == "parsing" or cfg.eval.protocol == "popnet":  # parsing pairs
        return _parsing(cfg, model, progress)
    device = device_of(cfg)
    was_training = model.training
    model.eval()
    try:  # a caller that catches an evaluation error (a validation) gets its training mode back
        per_seed, manifests, protocol, datasets = [], [], None, {}
        for seed in cfg.eval.seeds:
            dataset, info = eval_dataset(cfg, seed)
            datasets[seed] = dataset
            protocol = info["protocol"]
            manifests.append(info["manifest_sha256"])
            if visualizer is not None:
                visualizer.class_names = dataset.source.class_names
            meter = FewShotMeter(info["classes"], min_episodes=cfg.eval.min_class_episodes)
            for batch, b, logits, label in scored_episodes(cfg, model, dataset, seed, device, progress):
                inter, union = episode_iou_counts(logits.argmax(0), label, num_classes=logits.shape[0])
                meter.update(batch["classes"][b:b + 1], inter[None], union[None], batch["index"][b:b + 1])
                if visualizer is not None and union[1] > 0:
                    visualizer.offer(seed, int(batch["index"][b]), float(inter[1]) / float(union[1]))
            meter.all_reduce()
            if dist.is_main() and cfg.eval.split == "test":  # every episode's (I, U), to recompute any variant
                (Path(cfg.out) / "episodes").mkdir(parents=True, exist_ok=True)
                meter.to_json(Path(cfg.out) / "episodes" / f"seed{seed}.json", seed=seed, protocol=protocol,
                              manifest_sha256=info["manifest_sha256"])
            per_seed.append({"seed": seed, **meter.summary()})
        if visualizer is not None:  # every rank's scores, the three picks drawn on rank 0
            visualizer.scores = [s for rank in dist.all_gather_objects(visualizer.scores) for s in rank]
            if dist.is_main():
                visualizer.render(datasets, model, lambda batch: to_device(batch, device))
    finally:
        model.train(was_training)
    stats = seed_statistics(per_seed)
    return {"miou": stats["miou"]["mean"], "miou_std": stats["miou"]["std"], "fb_iou": stats["fb_iou"]["mean"],
            "fb_iou_std": stats["fb_iou"]["std"], "std_kind": stats["std_kind"],
            "per_class": {c: v["mean"] for c, v in stats["per_class"].items()}, "per_seed": per_seed,
            "episodes": len(datasets[cfg.eval.seeds[-1]]), "seeds": list(cfg.eval.seeds), "split": cfg.eval.split,
            "protocol": protocol, "manifest_sha256": manifests}


@torch.no_grad()
def scored_episodes(cfg: Config, model, dataset, seed: int, device, progress: bool = False):
    """This rank's shard of ``dataset`` run through ``model``, one (batch, b, logits, label) per episode: item b's
    logits (C, H, W) restored by the transform's rule and the label they are scored against, on ``device``: the
    original label, or (HSNet's default, score_at=input) the input-size mask. Shared with engine/parsing_eval."""
    from .trainer import autocast, to_device
    shard = list(range(dist.rank(), len(dataset), dist.world_size()))
    loader = episode_loader(dataset, shard, cfg.eval.batch_size, cfg.data.num_workers, seed=seed, device=device)
    for batch in _progress(loader, f"eval {cfg.eval.split} seed {seed}", progress and dist.is_main()):
        batch = to_device(batch, device)
        with autocast(cfg, device):
            logits = model(batch)["logits"].float()
        for b in range(logits.shape[0]):
            restore = batch["restore"][b]
            label = batch["query_mask"][b] if restore["score_at"] == "input" else batch["query_label_orig"][b]
            yield batch, b, restore_logits(logits[b], restore), label.to(device)


def _parsing(cfg: Config, model, progress: bool) -> dict:
    """Human-parsing models (POPNet): one confusion matrix per seed (engine/parsing_eval.py); ``miou`` is
    the human mIoU (all classes, background included), the novel and base mIoU are reported beside it."""
    import numpy as np

    from ..data.datasets import build_source
    from .parsing_eval import evaluate_parsing
    per_seed = evaluate_parsing(cfg, model, len(build_source(cfg.data, "test").class_names), progress)["per_seed"]
    out = {"metric": "parsing", "per_seed": per_seed, "episodes": per_seed[0]["episodes"],
           "seeds": list(cfg.eval.seeds), "split": cfg.eval.split, "protocol": per_seed[0]["protocol"],
           "manifest_sha256": [s["manifest_sha256"] for s in per_seed], "fb_iou": None, "fb_iou_std": None,
           "std_kind": "population (ddof=0)"}
    for key in ("human_miou", "novel_miou", "base_miou", "bi_iou", "pixel_accuracy"):
        values = [s[key] for s in per_seed if s.get(key) is not None]
        if values:
            out[key], out[key + "_std"] = float(np.mean(values)), float(np.std(values))
    out["miou"], out["miou_std"] = out["human_miou"], out["human_miou_std"]
    return out


def _progress(loader, desc, enabled):
    if not enabled:
        return loader
    from tqdm import tqdm
    return tqdm(loader, desc=desc, dynamic_ncols=True, mininterval=1.0)


def finite_or_null(value):
    """``value`` with every NaN or infinite float as None: metrics.json stays strict JSON (a parsing class no image
    holds, such as LIP's hat on VITON, has no IoU; a bare NaN is refused by jq and JavaScript)."""
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def refuse_trained_fold(cfg: Config, trained: dict, source) -> None:
    """Refuses to test a model on another fold of the dataset it trained on, whose novel classes include its training
    classes; ``trained`` is the ``data`` section of the config that trained it (its run folder's or checkpoint's).
    The fold is its number with the split that numbers it (COCO's ``fold_convention``, a folder's ``folds``).
    Another dataset (UMTFSS's pseudo tasks) or root is not checked."""
    same_data = (cfg.data.dataset == trained.get("dataset")  # (../data/x and /work/data/x are one dataset)
                 and Path(cfg.data.root).resolve() == Path(trained.get("root", "")).resolve())
    keys = ("fold", "fold_convention", "folds")
    now = {k: getattr(cfg.data, k) for k in keys}
    then = {k: trained.get(k, getattr(DataConfig(), k)) for k in keys}
    if same_data and now != then:
        split = "".join(f", {k} {then[k]}" for k in keys[1:] if now[k] != then[k])
        raise ConfigError(f"{source} was trained on fold {then['fold']}{split} of {cfg.data.dataset} "
                          f"({trained['root']}): this test's classes include classes it trained on; evaluate it on "
                          f"its fold (or train a run for this one)")


def evaluate(cfg: Config, checkpoint: Optional[Path] = None) -> dict:
    """Build the model of ``cfg`` (weights from ``checkpoint`` when given), evaluate it and write
    ``cfg.out/metrics.json`` on rank 0."""
    from ..models import create_model
    from . import checkpoint as ckpt
    from .logging import tensorboard_writer, write_run_info
    from .visualize import EpisodeGallery
    from .trainer import device_of, for_checkpoint
    cfg = with_protocol_defaults(cfg)  # metrics.json's config records the episodes and seeds that ran
    dist.init_from_env(cfg.device)
    torch.manual_seed(cfg.seed)  # a model without weights files must be the same model every time
    model = create_model((cfg if checkpoint is None else for_checkpoint(cfg)).model, cfg.ops).to(device_of(cfg))
    if checkpoint is not None:
        payload = ckpt.load(checkpoint)
        refuse_trained_fold(cfg, payload["config"]["data"], checkpoint)
        model.load_state_dict(payload["model"])
    gallery = EpisodeGallery() if cfg.eval.visualize else None
    result = evaluate_model(cfg, model, visualizer=gallery)
    result["checkpoint"] = str(checkpoint) if checkpoint else None
    result["config"] = to_dict(cfg)
    if dist.is_main():
        out = Path(cfg.out)
        write_run_info(cfg, out)
        if gallery is not None:
            writer = tensorboard_writer(out)
            result["overlays"] = [str(p) for p in gallery.write(out / "overlays", writer)]
            if writer is not None:
                writer.close()
        (out / "metrics.json").write_text(json.dumps(finite_or_null(result), indent=1, allow_nan=False))
    return result
