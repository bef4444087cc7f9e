"""The episodic training loop: torchvision references/segmentation's plain loop, plus what the
public FSS code lacks (engine-anchors §d): exact resume, atomic checkpoints, honest model
selection on held-out base classes, AMP, accumulation, DDP through one code path.

Exactness: every random choice of the data comes from (seed, episode index); the optimizer step
t of rank r reads episodes ``t * G + m * B * W + r * B + j`` (G = B * accumulate * W episodes
per step, micro-batch m, item j), so the episodes of a step do not depend on the worker count,
the world size at the same B * W, or where a run was resumed; the model's own randomness (dropout) uses torch's
global RNG, whose state (with python's, numpy's and CUDA's) is saved per rank in every checkpoint.
"""
import json
import math
import time
import warnings
from contextlib import nullcontext
from fractions import Fraction
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from ..models import create_model
from . import checkpoint as ckpt
from . import distributed as dist
from .config import Config, ConfigError, config_from_dict, override_items, read_yaml, to_dict, with_overrides
from .data import episode_loader, eval_dataset, train_dataset
from .evaluator import evaluate_model
from .logging import RunLogger, write_run_info
from .optim import build_optimizers, build_schedulers


class NonFiniteLossError(FloatingPointError):
    pass


def device_of(cfg: Config) -> torch.device:
    if cfg.device.startswith("cuda"):
        return torch.device("cuda", dist.local_rank()) if cfg.device == "cuda" else torch.device(cfg.device)
    return torch.device(cfg.device)


def autocast(cfg: Config, device: torch.device):
    if cfg.amp == "none":
        return nullcontext()
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def train(cfg: Config, overrides: Sequence[str] = ()) -> Path:
    """Run every phase of ``cfg`` (or the one phase it is), each in ``out/<phase name>`` and each
    starting from the weights the previous phase ended with. Returns the last phase's folder.
    ``overrides``: the run's own key=value settings (the command line's); a phase keeps its own over them, with
    a warning (``phase_settings``); a run at another fold than a phase is written for is refused
    (``refuse_other_fold``) before any phase starts."""
    dist.init_from_env(cfg.device)
    if not cfg.train.phases:
        return train_phase(cfg)
    for i, phase in enumerate(cfg.train.phases):
        unknown = set(phase) - {"name", "config", "fold"}
        if unknown or "name" not in phase:
            raise ValueError(f"train.phases[{i}] needs 'name', and optionally 'config' (dotted overrides) and 'fold' "
                             f"(the fold it is written for); got {sorted(phase)}")
    refuse_other_fold(cfg)  # these checks before anything is written to out
    refuse_overwrite(cfg)
    if dist.is_main():  # the run folder's own config lists the phases (evaluate.py reads it)
        write_run_info(cfg, Path(cfg.out))
    previous = None
    for phase in cfg.train.phases:
        sub = with_overrides(cfg, {"out": str(Path(cfg.out) / phase["name"]), "train.phases": [],
                                   **phase_settings(phase, overrides)})
        previous = train_phase(sub, init_from=previous)
    return previous


# each budget key and the other way of counting the same budget
BUDGET_PARTNER = {"train.iters": "train.epochs", "train.epochs": "train.iters",
                  "train.warmup_iters": "train.warmup_epochs", "train.warmup_epochs": "train.warmup_iters"}


def phase_settings(phase: dict, overrides: Sequence[str]) -> dict:
    """A phase's own settings, which it keeps over the run's (RILFS's base phase keeps its 400 iterations under
    ``train.iters=2000``, which sets the meta phase's); a key=value of the command line that a phase shadows
    is said in a warning, no longer silently. A phase that counts its budget one way (``train.iters`` or
    ``train.epochs``, and the warm-up's pair) sets the other to 0: else it inherited the run's other count and
    the two disagreed (a PASCAL RILFS run shortened by ``train.iters=N train.epochs=0`` stopped at the base
    phase's ``train.epochs: 100``, told to set one of them to 0, which it could not)."""
    settings = dict(phase.get("config", {}))
    counted = {BUDGET_PARTNER[k]: 0 for k in settings if k in BUDGET_PARTNER and BUDGET_PARTNER[k] not in settings}
    for key, value in override_items(list(overrides)):
        shadowing = [k for k in settings if key == k or key.startswith(k + ".")]
        if key in counted and dist.is_main():
            own = BUDGET_PARTNER[key]
            warnings.warn(f"phase {phase.get('name')!r} counts its budget by its own {own}={settings[own]!r}; the "
                          f"command line's {key}={value!r} applies to the phases that do not set it", stacklevel=2)
        elif shadowing and key not in ("out", "train.phases") and dist.is_main():
            warnings.warn(f"phase {phase.get('name')!r} keeps its own {shadowing[0]}={settings[shadowing[0]]!r}; the "
                          f"command line's {key}={value!r} applies to the phases that do not set it", stacklevel=2)
    return {**settings, **counted}


def refuse_other_fold(cfg: Config) -> None:
    """Refuses a run at another ``data.fold`` than a phase says it is written for (its ``fold:``): such a phase's
    settings (UMTFSS's image lists and pseudo-task folder) belong to that fold and cannot follow, so each fold
    has its own config. A phase's own ``data.fold`` says nothing about this: UMTFSS's stage B sets the pseudo
    dataset's one fold, 0, in every fold's config, and PASCAL's stages A and B, built from every training image,
    serve every fold."""
    for phase in cfg.train.phases:
        if "fold" in phase and (not isinstance(phase["fold"], int) or isinstance(phase["fold"], bool)):
            raise ConfigError(f"phase {phase.get('name')!r}: fold must be a fold number; got {phase['fold']!r}")
        if "fold" in phase and phase["fold"] != cfg.data.fold:
            raise ConfigError(f"phase {phase.get('name')!r} is written for data.fold={phase['fold']} (its lists "
                              f"and folders with it); data.fold={cfg.data.fold} needs a config of that fold")


def refuse_overwrite(cfg: Config) -> None:
    """A multi-phase run's folder before its own config.yaml is rewritten (each phase checks its checkpoint again):
    a phase's checkpoint without resume=true, or a resume with settings the run did not have, is refused here, not
    after the run's config.yaml, which evaluate.py reads, has taken the refused settings."""
    out = Path(cfg.out)
    held = [out / phase["name"] / "last.pt" for phase in cfg.train.phases]
    held = [path for path in held if path.is_file()]
    if held and not cfg.resume:
        raise FileExistsError(f"{out} already holds a run ({held[0]}); pass resume=true to continue it, or another "
                              f"out=")
    if held and (out / "config.yaml").is_file():
        refuse_changes(changed_settings(read_yaml(out / "config.yaml"), to_dict(cfg)), out)


def finished_at(out: Path) -> Optional[int]:
    """The iteration a finished run in out ended at, or None. done.json counts only with the last.pt it was
    written after: a fresh run in a folder whose last.pt had been removed would otherwise, once killed and
    resumed, be taken for the earlier run that finished there."""
    try:
        finished = json.loads((out / "done.json").read_text())["iteration"]
        saved = ckpt.load(out / "last.pt")["iteration"]
    except (FileNotFoundError, ValueError, KeyError, ckpt.CheckpointError):
        return None
    return finished if finished == saved else None


def train_phase(cfg: Config, init_from: Optional[Path] = None) -> Path:
    dist.init_from_env(cfg.device)
    device = device_of(cfg)
    out = Path(cfg.out)
    last, best = out / "last.pt", out / "best.pt"
    finished = finished_at(out)
    if finished is not None and cfg.resume:  # a finished run, or a finished phase of a multi-phase one
        if cfg.train.epochs == 0 and finished != cfg.train.iters:
            raise ConfigError(f"resume: {out} finished at iteration {finished}, and train.iters is "
                             f"{cfg.train.iters}: a finished run is not extended (its schedule has ended); start a "
                             f"new run (out=...)")
        check_resume(ckpt.load(last), to_dict(cfg), last)  # not another fold's or seed's run passed off as this one
        return out
    if last.is_file() and not cfg.resume:
        raise FileExistsError(f"{out} already holds a run ({last}); pass resume=true to continue it, or another out=")
    if cfg.train.warmup_epochs > 0 and cfg.train.epochs == 0:
        raise ConfigError("train.warmup_epochs counts the pool's epochs as train.epochs does: set train.epochs, or "
                          "give the warm-up as train.warmup_iters")
    if cfg.train.val_every and cfg.train.val_episodes > 0 and not holds_validation(cfg):
        raise ConfigError("train.val_every validates on held-out base-class images or classes, and data.val_fraction "
                         "is 0 with no data.val_classes: set one of them, or train.val_every=0")

    torch.manual_seed(cfg.seed + dist.rank())
    replaced = init_from is not None or (cfg.resume and last.is_file())  # a checkpoint then sets every weight
    model = create_model((for_checkpoint(cfg) if replaced else cfg).model, cfg.ops).to(device)
    if init_from is not None:
        model.load_state_dict(ckpt.load(Path(init_from) / "last.pt")["model"])
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(f"model {cfg.model.name!r} has no trainable parameter: a training-free model is "
                         f"evaluated (python/evaluate.py), not trained")
    dataset = train_dataset(cfg)
    if cfg.train.epochs > 0:  # before the schedulers, whose poly decay runs over the iterations
        counted = {}
        for iters_key, epochs_key in (("iters", "epochs"), ("warmup_iters", "warmup_epochs")):
            epochs, given = getattr(cfg.train, epochs_key), getattr(cfg.train, iters_key)
            if epochs > 0:
                value = iters_for_epochs(cfg, len(dataset.manifest.episodes), epochs)
                if given not in (0, value):  # (a run's saved config holds both, equal)
                    raise ConfigError(f"train.{epochs_key}={epochs:g} is {value} iterations on this fold's pool, and "
                                      f"train.{iters_key}={given} says otherwise: set one of them (the other to 0)")
                counted[f"train.{iters_key}"] = value
        cfg = with_overrides(cfg, counted)
    if cfg.train.iters == 0:
        raise ConfigError(f"model {cfg.model.name!r} has trainable parameters and train.iters and train.epochs are "
                          f"both 0: set the training budget")
    calls = cfg.train.iters * cfg.train.accumulate  # training forward calls per process
    if getattr(model, "scheduled_calls", calls) != calls:  # a model that counts its own schedule (POPNet)
        raise ConfigError(f"model {cfg.model.name!r} counts its own schedule over model.params.iters="
                          f"{model.scheduled_calls} training forward calls, and this run makes {calls} (train.iters "
                          f"x train.accumulate): set model.params.iters={calls}")
    steps = cfg.train.lr_steps
    late = [f"train.warmup_iters={cfg.train.warmup_iters}"] * (cfg.train.warmup_iters > cfg.train.iters)
    late += [f"train.lr_steps={steps}"] * bool(steps and steps[-1] >= cfg.train.iters)
    if late and dist.is_main():  # a shortened paper recipe (a smoke run) may mean it; a typo would go unseen
        warnings.warn(f"{' and '.join(late)} reach past train.iters={cfg.train.iters}: that part of the LR schedule "
                      f"never runs", stacklevel=2)
    if cfg.train.val_episodes > 0 and holds_validation(cfg):  # now, not at the first validation (the run's end)
        eval_dataset(validation_config(cfg), cfg.seed)  # raises where the held-out images or classes make no episode
    optimizers = build_optimizers(model, cfg.train)
    schedulers = build_schedulers(optimizers, cfg.train)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    state = {"iteration": 0, "best": None}
    if cfg.resume and last.is_file():
        payload = ckpt.load(last)
        check_resume(payload, to_dict(cfg), last)
        model.load_state_dict(payload["model"])
        if (len(payload["optimizers"]), len(payload["schedulers"])) != (len(optimizers), len(schedulers)):
            raise ValueError(f"resume: {last} holds {len(payload['optimizers'])} optimizers, and the model now builds "
                             f"{len(optimizers)} (its parameter groups changed with the code): start a new run")
        for opt, s in zip(optimizers, payload["optimizers"]):
            opt.load_state_dict(s)
        for sched, s in zip(schedulers, payload["schedulers"]):
            sched.load_state_dict(s)
        scaler.load_state_dict(payload["scaler"])
        if len(payload["rng"]) == dist.world_size():
            ckpt.set_rng_state(payload["rng"][dist.rank()], device)
        elif dist.is_main():  # same episodes per step (resume_changes checked B * W); the random streams differ
            warnings.warn(f"resume: {last} was saved by {len(payload['rng'])} processes, this run has "
                          f"{dist.world_size()} with the same episodes per step: the episodes and their "
                          f"augmentation continue as they were, the model's random draws (dropout) start from the "
                          f"seed", stacklevel=2)
        state = {"iteration": payload["iteration"], "best": payload["best"]}
        # a validation past this checkpoint (the run was killed before the next last.pt) may have written best.pt:
        # its record stands, or a later, lower score would beat the checkpoint's older best and overwrite it
        ahead = None
        if dist.is_main() and best.is_file():
            saved = ckpt.load(best)
            if saved["iteration"] > state["iteration"] and saved["best"] is not None:
                ahead = saved["best"]
        ahead = dist.all_gather_objects(ahead)[0]
        if ahead is not None:
            state["best"] = ahead
    if dist.is_main() and (out / "done.json").is_file():
        # not this run's (finished_at said so): an earlier run's here, whose last.pt was removed or overwritten;
        # left in place, it would pass this run off as finished when it is resumed after a kill
        (out / "done.json").unlink()
    if dist.is_main() and state["iteration"] == 0 and best.is_file():
        # an earlier run here validated and was stopped before its first last.pt: its best.pt is not this run's,
        # and evaluating the folder would pick it (this run may never validate to replace it)
        warnings.warn(f"{out} holds best.pt but no last.pt (a run stopped before its first checkpoint): this run "
                      f"starts from scratch and removes that best.pt", stacklevel=2)
        best.unlink()
    if dist.is_main():
        write_run_info(cfg, out)

    wrapped = model
    if dist.world_size() > 1:
        wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                          find_unused_parameters=cfg.train.find_unused_parameters
                                          or getattr(model, "ddp_find_unused_parameters", False))
    loader = episode_loader(dataset, positions(cfg, state["iteration"]), cfg.data.batch_size, cfg.data.num_workers,
                            seed=cfg.seed + state["iteration"], device=device)
    logger = RunLogger(out, cfg.train.iters, start=state["iteration"], enabled=dist.is_main(),
                       every=cfg.train.log_every)

    def save(path):
        rngs = dist.all_gather_objects(ckpt.rng_state(device))
        if dist.is_main():
            ckpt.save_atomic({"model": model.state_dict(), "optimizers": [o.state_dict() for o in optimizers],
                              "schedulers": [s.state_dict() for s in schedulers], "scaler": scaler.state_dict(),
                              "rng": rngs, "iteration": state["iteration"], "best": state["best"],
                              "config": to_dict(cfg)}, path)
        dist.barrier()

    def validate_and_save():  # last.pt then carries the best so far, which a resume reads
        if validate(cfg, model, state, logger, save_best=lambda: save(best)):
            save(last)

    batches = iter(loader)
    stopped_in_final_validation = state["iteration"] == cfg.train.iters  # a resume with no step left
    wrapped.train()
    while state["iteration"] < cfg.train.iters:
        it = state["iteration"]
        tic = time.perf_counter()
        losses_sum = {}
        for m in range(cfg.train.accumulate):
            batch = to_device(next(batches), device)
            sync = nullcontext() if m == cfg.train.accumulate - 1 or dist.world_size() == 1 else wrapped.no_sync()
            with sync:
                with autocast(cfg, device):
                    losses = wrapped(batch)["losses"]
                if not losses:
                    raise ValueError(f"model {cfg.model.name!r} returned no losses in training mode")
                loss = sum(losses.values())
                check_finite(loss, losses, it, last)
                scaler.scale(loss / cfg.train.accumulate).backward()
            for k, v in losses.items():
                losses_sum[k] = losses_sum.get(k, 0.0) + float(v.detach()) / cfg.train.accumulate
        for opt in optimizers:
            scaler.unscale_(opt)
        params = [p for o in optimizers for g in o.param_groups for p in g["params"] if p.grad is not None]
        if cfg.train.clip_grad:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.clip_grad)
        else:  # a finite loss can still have a nan gradient (sqrt at 0): stepping on it would save nan weights
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # GradScaler skips only the optimizers whose own gradients overflowed; an overflow anywhere makes the
        # joint norm inf (and the clipping scale every gradient by 0), so then no optimizer steps (fp16's first
        # steps overflow by design: another optimizer would apply its weight decay and momentum to zeros)
        if torch.isfinite(norm):
            for opt in optimizers:
                scaler.step(opt)
        elif not scaler.is_enabled() and dist.is_main():  # fp16 overflows by design; fp32 / bf16 should not
            warnings.warn(f"iteration {it + 1}: the gradient norm is {float(norm)}; no optimizer stepped")
        scaler.update()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        lrs = {type(opt).__name__.lower(): opt.param_groups[0]["lr"] for opt in optimizers}  # the LRs this step used
        for sched in schedulers:
            sched.step()
        state["iteration"] = it + 1
        logger.step(state["iteration"], mean_over_ranks(losses_sum), lrs, seconds=time.perf_counter() - tic)

        if state["iteration"] == cfg.train.iters:
            save(last)  # the weights first: a final validation that fails (a bad eval setting, memory) loses no step
            validate_and_save()
            break
        if cfg.train.val_every and state["iteration"] % cfg.train.val_every == 0:
            validate(cfg, model, state, logger, save_best=lambda: save(best))
        if state["iteration"] % cfg.train.checkpoint_every == 0:
            save(last)
    if stopped_in_final_validation:
        validate_and_save()
    if dist.is_main():
        ckpt.write_atomic(out / "done.json",
                          lambda f: f.write(json.dumps({"iteration": state["iteration"], "best": state["best"]})
                                            .encode()))
    logger.close()
    return out


# what may differ between a run and its resume: where and how it runs (a preempted job may come back on a machine
# with the data and the backbone file elsewhere: the episodes are keyed by sample ids, and the weights come from
# the checkpoint), what it logs, how often it saves, how often it validates (on the same episodes), how it is
# evaluated. Anything else would not continue the run exactly, or would silently not apply (the optimizer state
# restores the saved lr).
RESUMABLE = ("out", "device", "ops", "resume", "data.root", "model.weights", "data.num_workers", "train.log_every",
             "train.checkpoint_every", "train.val_every", "train.find_unused_parameters", "eval")
# but the one the model selection scores with (the popnet protocol scores parsing metrics): changed on resume,
# best.pt's mIoU would be compared with another metric's. Validation resizes by its own rule (data.eval_dataset)
VALIDATION_PINNED = ("eval.protocol",)


def check_resume(payload: dict, now: dict, last: Path) -> None:
    refuse_changes(resume_changes(payload["config"], now, len(payload["rng"])), last)


def refuse_changes(changed: list, run: Path) -> None:
    if changed:
        raise ConfigError(f"resume: {'; '.join(changed)} differ from the run in {run}, which the resumed run "
                         f"would not continue exactly (the optimizer and schedule states restore the saved "
                         f"values); only {', '.join(RESUMABLE)} may change (of eval, not "
                         f"{', '.join(VALIDATION_PINNED)}): start a new run (out=...) instead")


def resume_changes(then: dict, now: dict, then_world: int) -> list:
    """The settings of ``now`` that differ from the checkpoint's ``then`` (a run saved by ``then_world``
    processes) and are not RESUMABLE, as "key a -> b". The batch size may change with the world size
    as long as a step reads the same episodes (B * W, module docstring)."""
    changed = changed_settings(then, now)
    per_step = then["data"]["batch_size"] * then_world, now["data"]["batch_size"] * dist.world_size()
    if per_step[0] != per_step[1]:
        changed.append(f"episodes per step per micro-batch (data.batch_size x world size) {per_step[0]} -> "
                       f"{per_step[1]}")
    return changed


def changed_settings(then: dict, now: dict) -> list:
    """The settings of ``now`` that differ from the saved ``then`` (config trees) and are not RESUMABLE (nor the
    batch size, which resume_changes compares per step), as "key a -> b". Iterations the saved run counted from
    its epochs stand for ``now``'s uncounted 0: the same epochs on the same pool. A ``then`` that no longer loads
    is one change, said so."""
    try:
        then = to_dict(config_from_dict(then))  # keys added since the run was saved take their defaults
    except ConfigError as e:
        return [f"the saved config no longer loads ({e})"]
    now = {**now, "train": dict(now["train"])}
    for iters_key, epochs_key in (("iters", "epochs"), ("warmup_iters", "warmup_epochs")):
        if now["train"][epochs_key] > 0 and now["train"][iters_key] == 0:
            now["train"][iters_key] = then["train"][iters_key]
    flat_then, flat_now = flatten(then), flatten(now)
    return [f"{k} {flat_then.get(k)!r} -> {flat_now.get(k)!r}" for k in sorted(set(flat_then) | set(flat_now))
            if flat_then.get(k) != flat_now.get(k) and k != "data.batch_size"
            and (k in VALIDATION_PINNED or not any(k == r or k.startswith(r + ".") for r in RESUMABLE))]


def flatten(tree: dict, prefix: str = "") -> dict:
    """``{dotted.key: leaf}`` of a config tree (lists and the free-form ``params`` mappings kept as leaves)."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and k not in ("params", "augment", "merge", "hierarchy"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def iters_for_epochs(cfg: Config, per_epoch: int, epochs: float) -> int:
    """``epochs`` passes over the ``per_epoch`` training episodes (every query image of the fold's pool once,
    PFENet's epoch) as optimizer steps of B * accumulate * W episodes, rounded up (``train.epochs``, and
    ``train.warmup_epochs``). The papers give their budgets in epochs, and the pools differ between folds (BAM's
    filter drops every image holding a novel class: COCO's fold 0, with person novel, keeps about half of what the
    other folds keep), so one fixed iteration count is one fold's epochs only."""
    per_step = cfg.data.batch_size * cfg.train.accumulate * dist.world_size()
    # exact: 1.1 epochs of 100 episodes at 10 a step is 11 steps, where float arithmetic gives 11.000000000000002
    return max(1, math.ceil(Fraction(str(epochs)) * per_epoch / per_step))


def positions(cfg: Config, start_iteration: int):
    """This rank's episode indices from ``start_iteration`` on, in loading order (module docstring)."""
    B, W, A, r = cfg.data.batch_size, dist.world_size(), cfg.train.accumulate, dist.rank()
    G = B * A * W
    return [t * G + m * B * W + r * B + j for t in range(start_iteration, cfg.train.iters)
            for m in range(A) for j in range(B)]


STARTING_FILES = ("init", "base_weights")  # model.params naming a checkpoint a model loads when it is built


def for_checkpoint(cfg: Config) -> Config:
    """``cfg`` to build a model whose every weight a checkpoint then replaces (a resume, the next phase, an
    evaluation): the files a model would start from (``model.params.init``, UMTFSS stage C's stage-B run;
    ``model.params.base_weights``, RILFS / BAM's phase-1 run) are not read, so the run does not need them
    (evaluated on another machine, or after that run was deleted)."""
    starts = {f"model.params.{k}": None for k in STARTING_FILES if (cfg.model.params or {}).get(k)}
    return with_overrides(cfg, starts) if starts else cfg


def mean_over_ranks(losses: dict) -> dict:
    """Each loss averaged over the ranks: the step's every episode, as one process at batch B x W logs it (rank 0's
    alone would log another curve, and another again after a resume at another world size). Gathered as objects:
    a rank whose batch skipped a term (no episode had it) must not stall a fixed-size reduction."""
    if dist.world_size() == 1:
        return losses
    ranks = dist.all_gather_objects(losses)
    return {k: sum(r[k] for r in ranks if k in r) / sum(k in r for r in ranks)
            for k in sorted({k for r in ranks for k in r})}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def check_finite(loss: torch.Tensor, losses: dict, iteration: int, last: Path) -> None:
    bad = torch.tensor(0.0 if torch.isfinite(loss) else 1.0)
    if dist.all_reduce_sum(bad).item() > 0:
        parts = ", ".join(f"{k}={float(v):.4g}" for k, v in losses.items())
        kept = f"the last good checkpoint is {last}" if last.is_file() else "no checkpoint was written yet"
        raise NonFiniteLossError(f"loss is not finite at iteration {iteration + 1} ({parts}); stopping; {kept}")


def holds_validation(cfg: Config) -> bool:
    """Whether the data config holds anything out for validation (images or classes)."""
    return cfg.data.val_fraction > 0 or bool(cfg.data.val_classes)


def validation_config(cfg: Config) -> Config:
    """The evaluation config of the trainer's model selection."""
    return with_overrides(cfg, {"eval.split": "val", "eval.episodes": cfg.train.val_episodes, "eval.seeds": [cfg.seed],
                                "eval.visualize": False, "eval.support_annotation": "mask"})  # on masks, as trained


def validate(cfg: Config, model, state: dict, logger, save_best) -> bool:
    """Model selection on held-out base-class images or classes (eval.split=val): never on the test classes.
    Runs under fork_rng so validating does not change the training's random stream. Whether it ran."""
    if cfg.train.val_episodes <= 0 or not holds_validation(cfg):  # nothing held out: the last weights stand
        return False
    dist.sync_buffers(model)  # every rank scores the model rank 0 checkpoints
    with torch.random.fork_rng(devices=[]):
        result = evaluate_model(validation_config(cfg), model, progress=False)
    model.train()
    miou = result["miou"]
    logger.scalars(state["iteration"], {"val/miou": miou, "val/fb_iou": result["fb_iou"]})
    if math.isnan(miou):  # before the comparison: a NaN first result would otherwise stay the best
        raise NonFiniteLossError(f"validation mIoU is NaN at iteration {state['iteration']}")
    if state["best"] is None or miou > state["best"]["miou"]:
        state["best"] = {"miou": miou, "iteration": state["iteration"]}
        save_best()
    return True
