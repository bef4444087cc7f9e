"""The two entry points (``python/train.py`` / ``fsskern-train``, ``python/evaluate.py`` /
``fsskern-evaluate``): a config file or run folder, then dotted ``key=value`` overrides."""
import argparse
import json
import sys
from pathlib import Path

from . import distributed as dist
from .config import ConfigError, load_config, read_yaml, to_dict


def _parser(prog, what):
    p = argparse.ArgumentParser(prog=prog, description=what,
                                epilog="Overrides: dotted keys with YAML values, e.g. data.fold=1 "
                                       "eval.seeds=[0,1,2] out=runs/x resume=true")
    p.add_argument("source")
    p.add_argument("overrides", nargs="*")
    return p


def train_main(argv=None) -> int:
    args = _parser("fsskern-train", "Train a model: python python/train.py CONFIG [key=value ...]").parse_args(argv)
    from .trainer import refuse_other_fold, train
    try:
        cfg = load_config(args.source, args.overrides)
        refuse_other_fold(cfg)  # before stage A, which train() would reach first
    except ConfigError as e:
        print(f"fsskern-train: {e}", file=sys.stderr)
        return 2
    # -- UMTFSS stage A (fsskern.pseudo_tasks): build the pseudo tasks of a `dataset: pseudo` phase with a
    # data.params.build block when missing, reuse them when complete (docs/pseudo_tasks.md)
    from ..backbones import WeightsError
    from ..data.io import DataError
    from ..pseudo_tasks import ensure_for_run
    try:
        ensure_for_run(cfg)
    except (ConfigError, DataError, WeightsError) as e:
        print(f"fsskern-train: stage A: {e}", file=sys.stderr)
        return 2
    # -- end of stage A
    try:
        out = train(cfg, args.overrides)
    except (ConfigError, DataError, WeightsError, FileExistsError) as e:  # the user's setting or file: no traceback
        print(f"fsskern-train: {e}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()  # under torchrun: a gloo group left to the interpreter's exit can abort a rank (SIGABRT)
    print(f"done: {out}")
    return 0


def last_phase(run: Path) -> Path:
    """The folder of a run's last phase (the run itself when it has one phase)."""
    phases = read_yaml(run / "config.yaml").get("train", {}).get("phases") or []
    return run / phases[-1]["name"] if phases else run


def run_checkpoint(run: Path, choice: str) -> Path:
    """The checkpoint ``choice`` (best | last | a path) of a one-phase run folder."""
    if choice not in ("best", "last"):
        return Path(choice)
    if choice == "best" and (run / "best.pt").is_file():
        return run / "best.pt"
    if (run / "last.pt").is_file():
        return run / "last.pt"
    raise FileNotFoundError(f"{run} holds no checkpoint (last.pt); has the run started?")


def evaluate_main(argv=None) -> int:
    args = _parser("fsskern-evaluate", "Evaluate: python python/evaluate.py (RUN_DIR | CONFIG) [key=value ...]. "
                   "A run folder is evaluated with its frozen config and its checkpoint (eval.checkpoint).") \
        .parse_args(argv)
    from .evaluator import evaluate, refuse_trained_fold
    source = Path(args.source)
    try:
        if source.is_dir():
            run = last_phase(source)
            # the path as a quoted YAML string: unquoted, "runs/a #2" would lose its comment part, "123" be a number
            out = json.dumps(str(source / "eval"), ensure_ascii=False)
            cfg = load_config(run / "config.yaml", [f"out={out}", "resume=false", *args.overrides])
            refuse_trained_fold(cfg, to_dict(load_config(run / "config.yaml"))["data"], source)
            checkpoint = run_checkpoint(run, cfg.eval.checkpoint)
        else:
            cfg = load_config(source, args.overrides)
            checkpoint = None if cfg.eval.checkpoint in ("best", "last") else Path(cfg.eval.checkpoint)
            t = cfg.train
            if checkpoint is None and (t.iters > 0 or t.epochs > 0 or t.phases):  # its weights are in a run folder
                budget = f"{len(t.phases)} phases" if t.phases else \
                    f"train.iters={t.iters}" if t.iters else f"train.epochs={t.epochs:g}"
                raise ConfigError(f"{source} trains its model ({budget}): evaluate the run folder "
                                  f"(python/evaluate.py {cfg.out}), name eval.checkpoint=PATH, or pass "
                                  f"train.iters=0 train.epochs=0 'train.phases=[]' to score the untrained model")
            out = Path(cfg.out)
            if (out / "last.pt").is_file() or any(out.glob("*/last.pt")):  # its config.yaml, run.json would go
                raise ConfigError(f"out={cfg.out} holds a training run: evaluate it as python/evaluate.py {cfg.out}, "
                                  f"or write the evaluation elsewhere (out=...)")
    except (ConfigError, FileNotFoundError) as e:
        print(f"fsskern-evaluate: {e}", file=sys.stderr)
        return 2
    from ..backbones import WeightsError
    from ..data.io import DataError
    try:
        result = evaluate(cfg, checkpoint)
    except (ConfigError, DataError, WeightsError) as e:  # as in train_main; a checkpoint of another fold
        print(f"fsskern-evaluate: {e}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()  # as in train_main
    print(json.dumps({k: result[k] for k in ("miou", "miou_std", "fb_iou", "fb_iou_std", "protocol")}))
    return 0
