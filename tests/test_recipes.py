"""Every recipe under configs/ loads: its bases resolve, every key and type passes the config schema, each
phase's overrides apply, and the model and backbone it names are registered. Catches a typo in a recipe
before a user's training run reaches it (data presets under configs/data/ are partial, used as bases)."""
from pathlib import Path

import pytest

from fsskern.backbones import list_backbones
from fsskern.data.datasets import build_source
from fsskern.data.io import DataError
from fsskern.engine.config import load_config, with_overrides
from fsskern.models import list_models

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
