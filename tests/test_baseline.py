"""The training-free baseline's feature cache: results equal the uncached features, and a full cache never
evicts an image the same call still needs."""
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
