"""Every recipe under configs/ loads: its bases resolve, every key and type passes the config schema, each
phase's overrides apply, and the model and backbone it names are registered. Catches a typo in a recipe
before a user's training run reaches it (data presets under configs/data/ are partial, used as bases); and the
models refuse values out of range."""
from pathlib import Path

import pytest

from fsskern.backbones import list_backbones
from fsskern.data.datasets import build_source
from fsskern.data.io import DataError
from fsskern.engine.config import ModelConfig, load_config, with_overrides
from fsskern.models import create_model, list_models

CONFIGS = Path(__file__).parents[1] / "configs"
RECIPES = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml") if p.parent.name != "data")


def test_recipes_are_found():
    assert len(RECIPES) > 50 and "rilfs/msrc_v2_mobilenet_v2.yaml" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_loads_with_every_phase(recipe):
    cfg = load_config(CONFIGS / recipe)
    phases = [with_overrides(cfg, {"train.phases": [], **phase.get("config", {})}) for phase in cfg.train.phases]
    for c in [cfg, *phases]:
        assert c.model.name in list_models(), c.model.name
        assert c.model.backbone is None or c.model.backbone in list_backbones(), c.model.backbone
        # the dataset takes the recipe's data.params (the data itself is not here: any other refusal may come)
        try:
            build_source(c.data, "train")
        except DataError as e:
            assert "unknown data.params" not in str(e), e


@pytest.mark.parametrize("name, key, value, what", [
    ("umtfss", "sgd_lr_mult", -15.0, "> 0"), ("umtfss", "transformer_lr", 0.0, "> 0"),
    ("umtfss", "transformer_weight_decay", -0.01, ">= 0"), ("crcnet", "lambda_sub", -1.0, ">= 0"),
    ("crcnet", "backbone_lr_mult", -0.1, ">= 0"), ("crcnet", "ft_lr", float("nan"), "> 0"),
    ("rilfs", "alpha", -0.5, ">= 0"), ("bam", "encoder_lr_mult", -1.0, ">= 0"), ("dpcl", "tau", -0.05, "> 0"),
    ("dpcl", "momentum", 1.5, "in \\[0, 1\\]"), ("panet", "cs_weight", "0.1", ">= 0"), ("popnet", "rate", 2.0, "in"),
])
def test_model_params_out_of_range_are_refused(name, key, value, what):
    """A negative group lr or loss weight would train by gradient ascent: PyTorch checks only the default lr."""
    with pytest.raises(ValueError, match=f"{name}: model.params.{key} must be a number {what}"):
        create_model(ModelConfig(name=name, backbone="resnet50" if name == "popnet" else "mobilenet_v2",
                                 params={key: value}))
