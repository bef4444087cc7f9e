"""torch.compile(fullgraph=True) of a module that calls both ops, forward and backward."""
import pytest
import torch
from torch.testing import assert_close

from fsskern import ops


class PriorAndPrototype(torch.nn.Module):
    """The part of a PFENet-style head that fsskern fuses: prototype + prior, then a 1x1 conv."""

    def __init__(self, channels):
        super().__init__()
        self.proj = torch.nn.Conv2d(channels + 1, 8, 1)

    def forward(self, query, support, masks):
        prototype = ops.masked_average_pool(support[:, 0], masks[:, :1]).squeeze(1)  # (B, C)
        prior = ops.prior_mask(query, support, masks, out_size=query.shape[-2:])
        expanded = prototype[:, :, None, None].expand_as(query)
        return self.proj(torch.cat([query * expanded, prior], 1))


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    model = PriorAndPrototype(16)
    query = torch.randn(2, 16, 9, 11, requires_grad=True)
    support = torch.randn(2, 3, 16, 9, 9, requires_grad=True)
    masks = (torch.rand(2, 3, 33, 33) < 0.4).float()
    eager_out = model(query, support, masks)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), (query, support))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(query, support, masks)
    grads = torch.autograd.grad(out.square().sum(), (query, support))
    assert_close(out, eager_out)
    for g, e in zip(grads, eager_grads):
        assert_close(g, e)


def test_compile_inductor_forward():
    torch._dynamo.reset()
    model = PriorAndPrototype(8)
    query, support = torch.randn(1, 8, 7, 7), torch.randn(1, 2, 8, 6, 6)
    masks = (torch.rand(1, 2, 21, 21) < 0.5).float()
    with torch.no_grad():
        assert_close(torch.compile(model, fullgraph=True)(query, support, masks), model(query, support, masks))


def meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


@pytest.mark.parametrize("call, message", [
    (lambda: torch.ops.fsskern.prototype_attention(meta(2, 1, 3, 4), meta(3, 1, 5, 4), meta(3, 1, 5, 4), None, 1.0,
                                                   0.0, 0), "must share \\(B, H\\)"),
    (lambda: torch.ops.fsskern.prototype_attention(meta(2, 1, 3, 4), meta(2, 1, 5, 6), meta(2, 1, 5, 4), None, 1.0,
                                                   0.0, 0), "q and k must share D"),
    # (query, support, support_mask, value, mode)
    (lambda: torch.ops.fsskern.local_conditional_attention(meta(2, 8, 5), meta(3, 8, 6), meta(3, 6),
                                                           meta(3, 4, 6), "exclude"), "batch sizes differ"),
    (lambda: torch.ops.fsskern.local_conditional_attention(meta(2, 8, 5), meta(2, 7, 6), meta(2, 6),
                                                           meta(2, 4, 6), "exclude"), "channel counts differ"),
    (lambda: torch.ops.fsskern.max_cosine(meta(2, 8, 5), meta(3, 1, 8, 6), meta(3, 1, 6), 1e-7), "differ between"),
    (lambda: torch.ops.fsskern.max_cosine(meta(2, 8, 5), meta(2, 1, 7, 6), meta(2, 1, 6), 1e-7), "differ between"),
    (lambda: torch.ops.fsskern.cluster_means(meta(2, 10, 4), meta(2, 9, dtype=torch.long), 3, 0.0),
     "assign must be \\(B, N\\)"),
    (lambda: torch.ops.fsskern.hamming_kmeans(meta(2, 10, dtype=torch.long), meta(2, 10, dtype=torch.bool),
                                              meta(3, 4, dtype=torch.long), 4, 2), "init \\(B, k\\)"),
    (lambda: torch.ops.fsskern.masked_average_pool(meta(2, 4, 5, 5, dtype=torch.long), meta(2, 1, 5, 5), "mask", 0.0),
     "features must be floating"),
], ids=["attention-batch", "attention-dim", "local-batch", "local-channels", "max_cosine-batch",
        "max_cosine-channels", "cluster_means-points", "hamming_kmeans-init", "pool-integer-features"])
def test_fakes_refuse_what_the_kernels_refuse(call, message):
    """A traced graph (torch.compile, export) fails at the mismatched call, as eager does, not with garbage shapes
    further on; each case by the check it is named for."""
    with pytest.raises(RuntimeError, match=message):
        call()
