"""The training-free baseline: its feature cache (results equal the uncached features, a full cache never evicts
an image the same call still needs), its input checks and k-way background."""
import pytest
import torch

from fsskern.engine.config import ModelConfig
from fsskern.models import create_model


def test_cache_full_within_one_call_returns_every_feature():
    torch.manual_seed(0)
    model = create_model(ModelConfig(name="baseline", backbone="mobilenet_v2", weights=None), "fused").eval()
    a, b, c = torch.randn(3, 1, 3, 33, 33).unbind(0)
    with torch.no_grad():
        direct = model._features(torch.cat([a, b, c]))
        one = direct[0].numel() * direct[0].element_size()
        model.params["cache_mb"] = 2.5 * one / 2 ** 20  # room for two images
        model.features(a), model.features(b)
        # a is a hit and the oldest entry; storing c (missing) would evict it before it is read
        got = model.features(torch.cat([a, c]))
    torch.testing.assert_close(got, direct[[0, 2]])
    assert len(model.cache) == 2 and model.cache_bytes == 2 * one


def build():
    torch.manual_seed(0)
    return create_model(ModelConfig(name="baseline", backbone="mobilenet_v2", weights=None), "fused").eval()


def test_cached_features_own_their_memory():
    """A cached image's features are its own tensor, not a view that keeps the whole batch's alive past cache_mb."""
    model = build()
    with torch.no_grad():
        model.features(torch.randn(5, 3, 33, 33))
    assert all(f._base is None for f in model.cache.values())


def test_support_masks_of_class_ids_are_refused():
    model = build()
    batch = {"query_img": torch.randn(1, 3, 33, 33), "support_imgs": torch.randn(1, 1, 3, 33, 33),
             "support_masks": torch.full((1, 1, 33, 33), 15)}
    with pytest.raises(ValueError, match=r"baseline: support_masks must hold 0..1 or 255; found \[15\]"):
        model(batch)


def test_k_way_background_is_decided_per_episode():
    """Episode 0 reads one support image for both ways (background: what no way annotates), episode 1 two images
    (each slot's 0 pixels): batched together, each gives what it gives alone."""
    model = build()
    g = torch.Generator().manual_seed(0)
    image, other = torch.randn(2, 3, 33, 33, generator=g).unbind(0)
    masks = torch.zeros(2, 2, 33, 33, dtype=torch.long)
    masks[:, 0, :10], masks[:, 1, 20:] = 1, 1
    batch = {"query_img": torch.randn(2, 3, 33, 33, generator=g), "classes": torch.tensor([[1, 2], [1, 2]]),
             "support_imgs": torch.stack([torch.stack([image, image]), torch.stack([image, other])]),
             "support_masks": masks}
    with torch.no_grad():
        both = model(batch)["logits"]
        alone = [model({k: v[i:i + 1] for k, v in batch.items()})["logits"] for i in range(2)]
    torch.testing.assert_close(both, torch.cat(alone))
