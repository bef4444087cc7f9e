"""UMTFSS stage A alone: build (or finish, or find complete) the pseudo tasks of every phase of a training
config that trains on ``dataset: pseudo`` with a ``data.params.build`` block (docs/pseudo_tasks.md).
python/train.py does the same before training.

    python python/build_pseudo_tasks.py CONFIG [key=value ...]
    python python/build_pseudo_tasks.py configs/umtfss/msrc_v2_mobilenet_v2.yaml

A phase keeps its own settings over the command line's, as in python/train.py: the recipes' stage-A phase sets
its whole ``data.params`` (the build block with it), so ``data.params.build.clusters=40`` does not reach it (a
warning says so); change the phase in the config instead.
"""
import argparse
import json
import sys

from fsskern.backbones import WeightsError
from fsskern.data.io import DataError
from fsskern.engine.config import ConfigError, load_config
from fsskern.engine.trainer import phase_settings
from fsskern.pseudo_tasks import ensure_for_run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, as python/train.py")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        for phase in cfg.train.phases:
            phase_settings(phase, args.overrides)  # warns where a phase's own setting shadows an override
        results = ensure_for_run(cfg, progress=not args.quiet)
    except (ConfigError, DataError, WeightsError) as e:
        print(f"build_pseudo_tasks: {e}", file=sys.stderr)
        return 2
    if not results:
        print("build_pseudo_tasks: no phase of this config trains on dataset: pseudo with data.params.build",
              file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
