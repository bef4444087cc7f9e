"""One typed configuration: a YAML file validated against dataclasses, plus dotted ``key=value``
overrides whose values are parsed as YAML (``eval.seeds=[0,1,2]``).

A config file may start from others with ``base: [path, ...]`` (paths relative to the file); keys
of later files and of the overrides win. Unknown keys are refused with the list of valid ones,
and values of the wrong type are refused with the key's dotted name.
"""
import dataclasses
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml


@dataclass
class DataConfig:
    dataset: str = "pascal"            # source registry name (fsskern.data.datasets)
    root: str = ""
    fold: int = 0
    shots: int = 1
    ways: int = 1
    train_size: int = 473              # square training crop
    test_size: int = 473
    batch_size: int = 4                # episodes per step and rank (before accumulation)
    num_workers: int = 2
    train_list: Optional[str] = None
    val_list: Optional[str] = None
    train_policy: str = "pfenet"       # pfenet: keep images, novel pixels -> bg; bam: drop them
    min_pixels: int = 2048             # the 2*32*32 rule
    fold_convention: str = "interleaved"  # COCO: interleaved (4j+i+1) | contiguous (20i+1..) | canet (40/20/20)
    folds: Optional[List[List[int]]] = None       # folder datasets: novel class ids per fold
    classes: Optional[str] = None                 # folder datasets: class-list file
    merge: Optional[Dict[str, List[int]]] = None  # class merges {new name: [old ids]}
    hierarchy: Optional[Dict[str, List[str]]] = None  # parsing: area -> fine classes
    val_fraction: float = 0.1          # held-out base-class images for model selection
    val_classes: Optional[List[int]] = None  # or held-out base classes (then val_fraction 0): never trained
    # PFENet's when no config names one; a key missing from the final mapping is off (transforms.from_config)
    augment: Dict[str, Any] = field(default_factory=lambda: {"scale": [0.9, 1.1], "rotate": 10.0,
                                                             "blur": True, "flip": True})
    params: Dict[str, Any] = field(default_factory=dict)  # dataset-specific, checked by the dataset


@dataclass
class ModelConfig:
    name: str = "baseline"
    backbone: str = "mobilenet_v2"
    weights: Optional[str] = None      # a file, "imagenet" (MobileNetV2 only) or null (random init)
    freeze_backbone: bool = True
    params: Dict[str, Any] = field(default_factory=dict)  # method hyper-parameters, checked by the model


@dataclass
class TrainConfig:
    iters: int = 0                     # optimizer steps; 0 = nothing to train (a training-free model)
    epochs: float = 0.0                # > 0: iters counted from the fold's training pool (trainer.iters_for_epochs)
    optimizer: str = "sgd"             # sgd | adamw (a model may put groups on another one)
    lr: float = 0.0025
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 0
    warmup_epochs: float = 0.0         # > 0 (with epochs): warmup_iters counted from the pool as epochs are
    poly_power: float = 0.9
    lr_steps: List[int] = field(default_factory=list)  # x lr_gamma at each, after warm-up (MultiStepLR), not poly
    lr_gamma: float = 0.1
    accumulate: int = 1                # micro-batches per optimizer step
    clip_grad: Optional[float] = None  # max global grad norm; None or 0: no clipping
    checkpoint_every: int = 500
    val_every: int = 0                 # 0: validate only at the end (never without validation episodes)
    val_episodes: int = 200
    log_every: int = 20
    find_unused_parameters: bool = False
    phases: List[Dict[str, Any]] = field(default_factory=list)  # [{name: ..., config: {dotted: value}, fold: k}]


@dataclass
class EvalConfig:
    protocol: str = "pfenet"
    episodes: Optional[int] = None     # None: the protocol's count for the dataset (val split: train.val_episodes)
    seeds: Optional[List[int]] = None  # None: the protocol's seeds (val split: [seed])
    split: str = "test"                # test: the fold's novel classes; val: data.val_classes or held-out images
    resize: Optional[str] = None       # test resize rule (pfenet | square | original); None: the protocol's
    score_at: Optional[str] = None     # original | input (HSNet's default; its --use_original_imgsize: original);
                                       # None: the protocol's
    batch_size: int = 1
    min_class_episodes: int = 10       # warn when a class gets fewer episodes
    visualize: bool = False            # overlays of the best, median and worst episodes (PNG + TensorBoard)
    checkpoint: str = "best"           # evaluating a run: best (on val; else last) | last | a file
    support_annotation: str = "mask"   # mask | box: supports annotated by their instances' boxes (CANet, CRCNet)


@dataclass
class Config:
    out: str = "runs/default"
    seed: int = 0
    device: str = "cpu"
    ops: str = "fused"                 # fused | reference
    amp: str = "none"                  # none | bf16 | fp16
    resume: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {"ops": ("fused", "reference"), "amp": ("none", "bf16", "fp16"),
           "data.train_policy": ("pfenet", "bam"), "data.fold_convention": ("interleaved", "contiguous", "canet"),
           "train.optimizer": ("sgd", "adamw"), "eval.split": ("test", "val"),
           "eval.resize": ("pfenet", "square", "original"), "eval.score_at": ("original", "input"),
           "eval.support_annotation": ("mask", "box")}
# counts a run divides by or loops over: 0 would divide by zero or train without a backward pass
POSITIVE = ("train.accumulate", "train.checkpoint_every", "train.log_every", "data.batch_size",
            "data.shots", "data.ways", "data.train_size", "data.test_size", "eval.batch_size")
# counts and budgets where 0 means none: a negative one (train.iters=-3) ran no step and left no checkpoint; and
# the optimizer's settings, where a negative one ascends (clip_grad=-1 scales every gradient by a negative factor,
# poly_power=-1 grows the LR through the run)
NON_NEGATIVE = ("train.iters", "train.epochs", "train.warmup_iters", "train.warmup_epochs", "train.val_every",
                "train.val_episodes", "train.lr", "train.momentum", "train.weight_decay", "train.poly_power",
                "train.lr_gamma", "train.clip_grad", "data.num_workers", "eval.episodes")


class ConfigError(ValueError):
    pass


def _merge(base: dict, update: dict, prefix: str = "") -> dict:
    """``update`` over ``base``, mappings merged key by key; an empty mapping replaces the base's (a recipe's
    ``params: {}`` clears what its base file set, e.g. MSRC-v2's ``void`` on a PASCAL recipe). A null over a
    mapping is refused: a section whose lines are all commented out (``eval:`` alone) would otherwise drop the
    base's whole section for the defaults (BAM's protocol and seeds) without a word."""
    out = dict(base)
    for key, value in update.items():
        if value is None and isinstance(out.get(key), dict):
            raise ConfigError(f"{prefix}{key} is empty (null) over a base that sets it: drop the line to keep the "
                              f"base's, or write {prefix}{key}: {{}} (on the command line {prefix}{key}={{}}) to "
                              f"clear it")
        if isinstance(value, dict) and value and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, f"{prefix}{key}.")
        else:
            out[key] = value
    return out


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core schema for scalars: ``1e-4`` is a float (YAML 1.1 reads a string),
    ``0123`` is 123 (1.1: octal 83), and only true / false are booleans (1.1 reads off, no, y as False), as a
    reader of ``train.lr=1e-4`` or ``model.params.profile=off`` expects."""


class YamlDumper(yaml.SafeDumper):
    """The safe dumper quoting a string that either schema reads as another type (``"1e5"``, ``"off"``), so that
    config.yaml reads back the same here and with plain PyYAML."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[-1] not in ("bool", "int", "float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _cls in (YamlLoader, YamlDumper):  # the dumper keeps 1.1's resolvers and adds 1.2's
    for _tag, _pattern, _first in (
            ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
            ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),  # before float: 12 is an int
            ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|"
                      r"\.(?:nan|NaN|NAN)", "-+0123456789.")):
        _cls.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first))


def _yaml12_int(loader, node) -> int:
    text = loader.construct_scalar(node)
    return int(text, 0 if text[:2] in ("0o", "0x") else 10)  # PyYAML's own reads a leading 0 as octal


YamlLoader.add_constructor("tag:yaml.org,2002:int", _yaml12_int)


def load_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)


def dump_yaml(tree) -> str:
    return yaml.dump(tree, Dumper=YamlDumper, sort_keys=False)


def read_yaml(path) -> dict:
    """A config file with its ``base`` files merged in (depth first, later keys win; ``{}`` empties a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    raw = load_yaml(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(raw).__name__}")
    bases = raw.pop("base", [])
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, read_yaml(path.parent / base))
    return _merge(merged, raw)


def set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        if tree.get(key) is None:  # an optional section left unset (data.merge) takes its first key
            tree[key] = {}
        node = tree[key]
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key} is not a section")
        tree = node
    tree[keys[-1]] = value


def override_items(args: List[str]) -> List[Tuple[str, Any]]:
    """[(dotted key, value)] of key=value arguments, each value read as YAML."""
    items = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"override {arg!r} is not of the form key=value")
        key, text = arg.split("=", 1)
        try:
            value = load_yaml(text) if text != "" else None
        except yaml.YAMLError as e:  # "[0,1": refused with the command line's message, not a traceback
            raise ConfigError(f"override {arg!r}: its value is not YAML ({' '.join(str(e).split())})") from None
        if "#" in text and "#" not in repr(value):  # YAML read " #..." as a comment: "w #1.pt" would load "w"
            raise ConfigError(f"override {arg!r}: YAML reads what follows ' #' as a comment; quote a value that "
                              f"holds one ({key}='\"a #b\"')")
        items.append((key.strip(), value))
    return items


def parse_overrides(args: List[str]) -> dict:
    tree: dict = {}
    for key, value in override_items(args):
        set_dotted(tree, key, value)
    return tree


def _check_type(name: str, value, hint):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _check_type(name, value, next(a for a in args if a is not type(None)))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_check_type(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value)] if args else list(value)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    return value


def _build(cls, tree: dict, prefix: str = ""):
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {tree!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(tree) - set(valid))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                          f"valid keys{' of ' + prefix.rstrip('.') if prefix else ''}: {', '.join(valid)}")
    kwargs = {}
    for key, value in tree.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, {} if value is None else value, f"{prefix}{key}.")  # `train:` alone
        else:
            kwargs[key] = _check_type(prefix + key, value, hint)
        if isinstance(kwargs[key], float) and not math.isfinite(kwargs[key]):  # nan passes every comparison
            raise ConfigError(f"{prefix}{key} must be finite, got {kwargs[key]}")
        choices = CHOICES.get(prefix + key)
        if choices and kwargs[key] is not None and kwargs[key] not in choices:  # None: an Optional's default
            raise ConfigError(f"{prefix}{key} must be one of {', '.join(choices)}, got {kwargs[key]!r}")
        if prefix + key in POSITIVE and kwargs[key] < 1:
            raise ConfigError(f"{prefix}{key} must be >= 1, got {kwargs[key]}")
        if prefix + key in NON_NEGATIVE and kwargs[key] is not None and kwargs[key] < 0:
            raise ConfigError(f"{prefix}{key} must be >= 0, got {kwargs[key]}")
        steps = kwargs[key] if prefix + key == "train.lr_steps" else []
        if steps and (steps[0] < 1 or any(b <= a for a, b in zip(steps, steps[1:]))):
            raise ConfigError(f"train.lr_steps must be increasing iterations >= 1, got {kwargs[key]}")
        if prefix + key == "eval.seeds" and kwargs[key] is not None and not kwargs[key]:
            raise ConfigError("eval.seeds must name at least one seed (or be unset: the protocol's), got []")
        if prefix + key == "eval.seeds" and kwargs[key] and len(set(kwargs[key])) < len(kwargs[key]):
            raise ConfigError(f"eval.seeds repeats a seed: {kwargs[key]} (the same episodes again would report a "
                              f"spread of 0 over seeds)")
    return cls(**kwargs)


def config_from_dict(tree: dict) -> Config:
    return _build(Config, tree)


def load_config(path=None, overrides: Optional[List[str]] = None, tree: Optional[dict] = None) -> Config:
    """The config of ``path`` (or of an already-read ``tree``) with ``overrides`` applied."""
    base = read_yaml(path) if path is not None else dict(tree or {})
    data = base.get("data")
    if not (isinstance(data, dict) and "augment" in data):  # no file names one: overrides edit the default's keys
        base = _merge(base, {"data": {"augment": DataConfig().augment}})
    return config_from_dict(_merge(base, parse_overrides(overrides or [])))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def with_overrides(cfg: Config, dotted: Dict[str, Any]) -> Config:
    """A copy of ``cfg`` with ``{dotted.key: value}`` applied (and validated)."""
    tree = to_dict(cfg)
    for key, value in dotted.items():
        set_dotted(tree, key, value)
    return config_from_dict(tree)


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()
