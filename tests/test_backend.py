"""get_backend("fused") vs get_backend("reference"): same names and signatures, same outputs and gradients."""
import inspect

import pytest
import torch
from torch.testing import assert_close

from conftest import FP32, FP64
from fsskern.backend import FUNCTIONS, get_backend

FUSED, REF = get_backend("fused"), get_backend("reference")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def leaf(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype).requires_grad_()


def both(fn_name, inputs, *args, **kw):
    """Run one function on both backends with fresh copies of the float leaves; return (outputs, grads) each."""
    results = []
    for backend in (FUSED, REF):
        leaves = [x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) and x.requires_grad else x
                  for x in inputs]
        out = getattr(backend, fn_name)(*leaves, *args, **kw)
        first = out[0] if isinstance(out, tuple) else out
        weight = torch.randn(first.shape, generator=gen(99), dtype=first.dtype)
        grads = torch.autograd.grad((first * weight).sum(), [x for x in leaves if isinstance(x, torch.Tensor)
                                                            and x.requires_grad])
        results.append((out, grads))
    return results


def assert_same(fn_name, inputs, *args, tol=FP32, **kw):
    (got, got_grads), (want, want_grads) = both(fn_name, inputs, *args, **kw)
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert_close(g, w.to(g.dtype) if g.is_floating_point() else w, **tol)
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w, **tol)


def test_same_names_and_signatures():
    assert FUSED.name == "fused" and REF.name == "reference"
    for name in FUNCTIONS:
        fused, ref = inspect.signature(getattr(FUSED, name)), inspect.signature(getattr(REF, name))
        assert [(p.name, p.kind, p.default) for p in fused.parameters.values()] == \
               [(p.name, p.kind, p.default) for p in ref.parameters.values()], name
    with pytest.raises(ValueError, match="'fused' or 'reference'"):
        get_backend("cuda")


@pytest.mark.parametrize("resize", ["mask", "features"])
def test_masked_average_pool(resize):
    masks = (torch.rand(2, 3, 33, 33, generator=gen(1)) < 0.4).float()
    assert_same("masked_average_pool", [leaf(2, 8, 9, 9), masks], resize=resize)


@pytest.mark.parametrize("resize", ["mask", "features", "nearest"])
def test_class_prototypes(resize):
    labels = torch.randint(0, 4, (2, 33, 33), generator=gen(1))
    labels[:, :5] = 255
    labels[0][labels[0] == 2] = 0  # an absent class
    assert_same("class_prototypes", [leaf(2, 8, 9, 9), labels, 4], resize=resize)


@pytest.mark.parametrize("reduce,out_size", [("mean", None), (None, (13, 11))])
def test_prior_mask(reduce, out_size):
    masks = (torch.rand(2, 2, 33, 33, generator=gen(2)) < 0.3).float()
    assert_same("prior_mask", [leaf(2, 16, 9, 9), leaf(2, 2, 16, 9, 9, seed=1), masks], reduce=reduce,
                out_size=out_size)


def test_max_cosine():
    weights = (torch.rand(2, 2, 40, generator=gen(2)) < 0.5).float()
    (got, got_grads), (want, want_grads) = both("max_cosine", [leaf(2, 8, 30), leaf(2, 2, 8, 40, seed=1), weights])
    assert_close(got[0], want[0], **FP32)
    assert torch.equal(got[1], want[1])
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w, **FP32)


@pytest.mark.parametrize("fg", ["sparse", "none"])
def test_support_prototypes(fg):
    masks = (torch.rand(2, 2, 36, 44, generator=gen(1)) < 0.3).float()
    if fg == "none":
        masks[0] = 0
    results = []
    for backend in (FUSED, REF):
        features = leaf(2, 2, 16, 9, 11)
        protos, valid = backend.support_prototypes(features, masks, k_fg=4, k_bg=9, iters=4, generator=gen(5))
        grad, = torch.autograd.grad((protos * torch.randn(protos.shape, generator=gen(6))).sum(), features)
        results.append((protos, valid, grad))
    (p, v, g), (rp, rv, rg) = results
    assert torch.equal(v, rv)
    assert_close(p, rp, **FP32)
    assert_close(g, rg, **FP32)


def test_support_prototypes_under_autocast_hash_the_same_numbers():
    """Inside torch.autocast the fused hash reads float32 tokens rounded to bf16 (its autocast rule); the reference
    rounds them alike, so both backends still cluster the same tokens the same way."""
    features, masks = torch.randn(2, 1, 32, 16, 16, generator=gen(1)), torch.rand(2, 1, 16, 16, generator=gen(2)) < 0.5
    planes = FUSED.lsh_planes(12, 32, generator=gen(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(FUSED.lsh_hash(features[:, 0].movedim(1, -1), planes),
                           REF.lsh_hash(features[:, 0].movedim(1, -1), planes))
        got, want = (backend.support_prototypes(features, masks, k_fg=4, k_bg=9, iters=4, generator=gen(5))
                     for backend in (FUSED, REF))
    assert torch.equal(got[1], want[1])
    # the same clusters; the reference's means are autocast's bf16 matmul (UMTFSS's), the fused ones float32
    # (a token hashed differently moves a prototype by ~5e-2)
    assert_close(got[0], want[0], atol=4e-3, rtol=0)


def test_prototype_attention_without_dropout():
    key_valid = torch.rand(2, 7, generator=gen(3)) < 0.7
    key_valid[:, 0] = True  # the two backends differ by design only when no key is valid
    assert_same("prototype_attention", [leaf(2, 2, 20, 8), leaf(2, 2, 7, 8, seed=1), leaf(2, 2, 7, 8, seed=2)],
                key_valid=key_valid, seed=123)


@pytest.mark.parametrize("mode", ["exclude", "multiply"])
def test_local_conditional_attention(mode):
    mask = (torch.rand(2, 30, generator=gen(3)) < 0.4).float()
    mask[:, 0] = 1
    assert_same("local_conditional_attention", [leaf(2, 8, 25), leaf(2, 8, 30, seed=1), mask],
                value=leaf(2, 5, 30, seed=2), mode=mode)


def test_clustering_pieces():
    x = torch.randn(2, 50, 6, generator=gen(0), dtype=torch.float64)
    planes = FUSED.lsh_planes(16, 6, generator=gen(1), dtype=torch.float64)
    codes = FUSED.lsh_hash(x, planes)
    assert torch.equal(codes, REF.lsh_hash(x, planes))
    valid = torch.rand(2, 50, generator=gen(2)) < 0.8
    fused = FUSED.hamming_kmeans(codes, 5, iters=3, valid=valid, generator=gen(3))
    ref = REF.hamming_kmeans(codes, 5, iters=3, valid=valid, generator=gen(3))
    for a, b in zip(fused, ref):
        assert torch.equal(a, b)
    maps = torch.randn(2, 2, 6, 5, 5, generator=gen(4), dtype=torch.float64)
    for features in (x, maps):
        assert_close(FUSED.cluster_means(features, fused[0], 5)[0], REF.cluster_means(features, fused[0], 5)[0],
                     **FP64)
