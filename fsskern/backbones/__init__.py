"""Backbones for the FSS models: ``create_backbone(name, weights, frozen_bn, output_stride)`` returns a module
whose forward gives {"layer0", ..., "layer4"} (DeepLabV3+: {"decoder", "encoder"}) and whose ``channels`` and
``strides`` dicts describe them. See docs/backbones.md."""
from . import deeplab, mobilenet, resnet, vgg, xception  # noqa: F401  (register the builders)
from .base import LAYERS, Backbone, LeanBatchNorm2d, fix_bn, freeze
from .registry import create_backbone, list_backbones, register_backbone, require_backbone
from .weights import LAYOUTS, WeightsError, expected_keys, load_weights, mobilenet_weights_file, read_model_state

__all__ = ["create_backbone", "list_backbones", "register_backbone", "require_backbone", "Backbone", "LeanBatchNorm2d",
           "fix_bn", "freeze", "LAYERS", "load_weights", "expected_keys", "mobilenet_weights_file", "WeightsError",
           "LAYOUTS", "read_model_state"]
