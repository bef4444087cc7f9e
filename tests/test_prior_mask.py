"""prior_mask / max_cosine against PFENet's prior."""
import pytest
import torch
from torch.testing import assert_close

from conftest import FP32, tol
from fsskern import ops, reference
from fsskern.reference import composed


def inputs(B, K, C, hq, wq, hs, ws, H, W, fg, signed, dtype=torch.float32):
    q = torch.randn(B, C, hq, wq, dtype=dtype)
    s = torch.randn(B, K, C, hs, ws, dtype=dtype)
    if not signed:  # post-ReLU, as PFENet's layer4
        q, s = q.relu(), s.relu()
    if fg == "empty":
        m = torch.zeros(B, K, H, W)
    elif fg == "full":
        m = torch.ones(B, K, H, W)
    else:
        m = (torch.rand(B, K, H, W) < fg).float()
    return q, s, m


# (B, K, C, hq, wq, hs, ws, H, W): square and not, K = 1..5, C 1..2048, masks at feature size
# and larger; the last crosses the CPU kernel's query chunk (2,160 > 2,048 pixels) and, with the full mask (600
# support pixels), its support tile (512).
SHAPES = [
    (2, 1, 64, 13, 17, 11, 9, 50, 41),
    (1, 5, 33, 20, 20, 15, 15, 15, 15),
    (2, 2, 1, 7, 5, 6, 8, 25, 33),
    (1, 1, 2048, 6, 7, 5, 5, 41, 41),
    (1, 3, 16, 15, 20, 25, 30, 97, 121),
    (1, 2, 8, 48, 45, 24, 25, 24, 25),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fg", [0.05, 0.3, 0.5, "empty", "full"])
@pytest.mark.parametrize("signed", [False, True], ids=["relu", "signed"])
@pytest.mark.parametrize("reduce", ["mean", None])
def test_matches_pfenet(shape, fg, signed, reduce):
    q, s, m = inputs(*shape, fg=fg, signed=signed)
    for normalize in (True, False):
        got = ops.prior_mask(q, s, m, normalize=normalize, reduce=reduce)
        want = reference.prior_mask(q, s, m, normalize=normalize, reduce=reduce)
        assert got.shape == want.shape
        assert_close(got, want, **FP32)


def test_out_size_and_float64():
    q, s, m = inputs(2, 3, 12, 9, 14, 10, 10, 37, 37, 0.4, True, dtype=torch.float64)
    for out_size in [(9, 14), (33, 27), (5, 5)]:
        assert_close(ops.prior_mask(q, s, m, out_size=out_size),
                     reference.prior_mask(q, s, m, out_size=out_size), **tol(torch.float64))


def test_signed_features_see_the_zero_background():
    # All foreground cosines negative: the reference's max is the masked-out pixels' exact 0.
    q = torch.ones(1, 4, 3, 3)
    s = -torch.ones(1, 1, 4, 2, 2)
    m = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    values, idx = ops.max_cosine(q.flatten(2), s.flatten(3), m.flatten(2))
    assert (values == 0).all() and (idx == -1).all()
    m_full = torch.ones(1, 1, 2, 2)
    values, idx = ops.max_cosine(q.flatten(2), s.flatten(3), m_full.flatten(2))
    assert_close(values, torch.full_like(values, -1.0), **FP32)
    assert (idx == 0).all()  # ties go to the lowest support index
    assert_close(ops.prior_mask(q, s, m, normalize=False), reference.prior_mask(q, s, m, normalize=False))


def test_empty_masks_give_zero_prior():
    q, s, m = inputs(2, 2, 8, 5, 6, 4, 4, 8, 8, "empty", True)
    assert (ops.prior_mask(q, s, m, reduce=None) == 0).all()


def test_argmax_indices_match_dense_argmax():
    q, s, m = inputs(2, 2, 10, 9, 8, 7, 6, 7, 6, 0.5, False)
    values, idx = ops.max_cosine(q.flatten(2), s.flatten(3), m.flatten(2))
    sm = s.flatten(3) * m.flatten(2)[:, :, None]
    cos = torch.einsum("bkcs,bcq->bksq", sm, q.flatten(2)) / (
        sm.norm(dim=2)[..., None] * q.flatten(2).norm(dim=1)[:, None, None] + 1e-7)
    dense_v, dense_j = cos.max(2)
    assert_close(values, dense_v, **FP32)
    fg = idx >= 0
    assert torch.equal(idx[fg], dense_j[fg])
    assert (dense_v[~fg] <= 1e-6).all()


def test_nan_propagates_like_the_reference():
    q, s, m = inputs(2, 1, 6, 5, 5, 5, 5, 5, 5, 0.5, False)
    q[0, 2, 1, 1] = float("nan")
    got = ops.prior_mask(q, s, m)
    want = reference.prior_mask(q, s, m)
    assert torch.isnan(got[0]).all() and torch.isfinite(got[1]).all()
    assert_close(got, want, equal_nan=True, **FP32)
    # a non-finite value under a masked-out support pixel: 0 * inf = NaN in the reference
    q, s, m = inputs(1, 2, 6, 5, 5, 5, 5, 5, 5, 0.5, False)
    m[0, 0, 0, 0] = 0
    s[0, 0, 3, 0, 0] = float("inf")
    assert_close(ops.prior_mask(q, s, m, reduce=None), reference.prior_mask(q, s, m, reduce=None),
                 equal_nan=True, **FP32)


def test_masked_out_pixel_is_the_references_cosine_at_every_eps():
    """A masked-out support pixel is the reference's 0 / (0 * |q| + eps): 0 with eps > 0, 0 / 0 = NaN with eps = 0
    (the kernels once gave 0 at every eps); and a finite float64 value past float32's range under it is no
    poison (the CPU kernel once tested finiteness in float32)."""
    q, s, m = inputs(1, 2, 6, 3, 3, 3, 3, 3, 3, 0.5, True)
    w = m.flatten(2)
    w[:, :, 0] = 0
    for eps in (1e-7, 0.0):
        got = ops.max_cosine(q.flatten(2), s.flatten(3), w, eps=eps)[0]
        want = composed.max_cosine(q.flatten(2), s.flatten(3), w, eps=eps)[0]
        assert_close(got, want, equal_nan=True, **FP32)
    assert torch.isnan(got).all()
    q, s, w = q.double(), s.double(), w.double()
    s[0, 0, 2, 0, 0] = 1e300
    got = ops.max_cosine(q.flatten(2), s.flatten(3), w)
    want = composed.max_cosine(q.flatten(2), s.flatten(3), w)
    assert torch.isfinite(got[0]).all()
    assert_close(got[0], want[0])
    assert torch.equal(got[1], want[1])


def test_non_contiguous_inputs():
    q = torch.randn(2, 9, 12, 16).transpose(2, 3)
    s = torch.randn(2, 9, 2, 14, 10).permute(0, 2, 1, 4, 3)  # (2, 2, 9, 10, 14)
    m = (torch.rand(2, 2, 40, 30) < 0.4).float()[:, :, ::2, ::2]
    assert not (q.is_contiguous() or s.is_contiguous() or m.is_contiguous())
    assert_close(ops.prior_mask(q, s, m), reference.prior_mask(q.contiguous(), s.contiguous(), m.contiguous()),
                 **FP32)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(normalize):
    # positive features keep every maximum away from the zero background and from ties, so the
    # finite differences see a smooth function
    q = (torch.rand(2, 6, 5, 4, dtype=torch.float64) + 0.1).requires_grad_()
    s = (torch.rand(2, 2, 6, 4, 3, dtype=torch.float64) + 0.1).requires_grad_()
    m = (torch.rand(2, 2, 8, 6) > 0.4).double()
    assert torch.autograd.gradcheck(lambda q, s: ops.prior_mask(q, s, m, reduce=None, normalize=normalize), (q, s))
    assert torch.autograd.gradcheck(lambda q, s: ops.max_cosine(q, s, m.flatten(2)[..., :12].contiguous())[0],
                                    (q.flatten(2), s.flatten(3)))


def test_gradients_match_reference_autograd():
    q, s, m = inputs(2, 3, 24, 9, 11, 8, 8, 30, 30, 0.4, True)
    q.requires_grad_()
    s.requires_grad_()
    grad = torch.randn(2, 1, 9, 11)
    got = torch.autograd.grad((ops.prior_mask(q, s, m) * grad).sum(), (q, s))
    want = torch.autograd.grad((reference.prior_mask(q, s, m) * grad).sum(), (q, s))
    for g, r in zip(got, want):
        assert_close(g, r, rtol=1e-4, atol=1e-5)


def test_opcheck():
    q, s, m = inputs(2, 2, 5, 4, 6, 3, 5, 3, 5, 0.5, True)
    w = m.flatten(2)
    for requires_grad in (False, True):
        args = (q.flatten(2).clone().requires_grad_(requires_grad), s.flatten(3).clone().requires_grad_(requires_grad),
                w, 1e-7)
        torch.library.opcheck(torch.ops.fsskern.max_cosine.default, args)
    qd, sd, md = inputs(1, 2, 4, 3, 3, 2, 2, 2, 2, 0.5, False, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fsskern.max_cosine.default,
                          (qd.flatten(2).requires_grad_(), sd.flatten(3).requires_grad_(),
                           md.double().flatten(2), 1e-7))


def test_deterministic_across_thread_counts():
    q, s, m = inputs(2, 2, 64, 30, 30, 30, 30, 30, 30, 0.5, True)
    q.requires_grad_()
    s.requires_grad_()
    previous = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = ops.prior_mask(q, s, m, reduce=None)
            results.append((out, *torch.autograd.grad(out.sum(), (q, s))))
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


BAD = [
    (dict(query=torch.randn(2, 4, 5)), ValueError, "expected query"),
    (dict(support=torch.randn(2, 1, 3, 5, 5)), RuntimeError, "channel counts differ"),
    (dict(support=torch.randn(3, 1, 4, 5, 5), support_masks=torch.ones(3, 1, 5, 5)), RuntimeError,
     "batch sizes differ"),
    (dict(support_masks=torch.ones(2, 2, 5, 5)), ValueError, "support_masks must be"),
    (dict(query=torch.randn(2, 4, 5, 5, dtype=torch.float64)), RuntimeError, "must share a dtype"),
    (dict(query=torch.randn(2, 4, 5, 5).int(), support=torch.randn(2, 1, 4, 5, 5).int()), RuntimeError,
     "float32, float64, float16 or bfloat16"),
    (dict(query=torch.randn(2, 4, 5, 5).bfloat16()), RuntimeError, "must share a dtype"),
    (dict(support_masks=torch.ones(2, 1, 5, 5, device="meta")), RuntimeError, "same device|one device"),
    (dict(support=torch.randn(2, 1, 4, 0, 5), support_masks=torch.ones(2, 1, 0, 5)), ValueError,
     r"support must have a non-empty \(h, w\) grid"),
    # degenerate grids used to fail inside F.interpolate or min() with messages naming neither
    (dict(support=torch.randn(2, 1, 4, 0, 5)), ValueError, r"support must have a non-empty \(h, w\) grid"),
    (dict(query=torch.randn(2, 4, 0, 5)), ValueError, r"query must have a non-empty \(h, w\) grid"),
    (dict(support_masks=torch.ones(2, 1, 5, 0)), ValueError, r"support_masks must have a non-empty \(h, w\) grid"),
    (dict(support=torch.randn(2, 0, 4, 5, 5), support_masks=torch.ones(2, 0, 5, 5)), ValueError,
     "at least one shot, got K = 0"),  # the mean over no shot was an all-NaN prior
    (dict(out_size=(0, 5)), ValueError, r"out_size must have a non-empty \(h, w\) grid"),
    (dict(out_size=5), ValueError, r"out_size must be an \(h, w\) pair"),  # was "'int' object is not iterable"
    (dict(eps=float("nan")), RuntimeError, "eps must be finite"),
    (dict(reduce="max"), ValueError, "reduce must be one of"),
    (dict(support_masks=torch.ones(2, 1, 5, 5, requires_grad=True)), ValueError, "not supported"),
]


@pytest.mark.parametrize("override,error,message", BAD, ids=[m for _, _, m in BAD])
def test_bad_inputs_raise_clear_errors(override, error, message):
    args = dict(query=torch.randn(2, 4, 5, 5), support=torch.randn(2, 1, 4, 5, 5), support_masks=torch.ones(2, 1, 5, 5))
    args.update(override)
    with pytest.raises(error, match=message):
        ops.prior_mask(**args)


def test_masks_that_require_grad_are_fine_without_grad_mode():
    masks = torch.ones(2, 1, 5, 5, requires_grad=True)
    with torch.no_grad():  # nothing is differentiated: no reason to refuse (an eval loop over a trained mask)
        prior = ops.prior_mask(torch.randn(2, 4, 5, 5), torch.randn(2, 1, 4, 5, 5), masks)
    assert prior.shape == (2, 1, 5, 5) and not prior.requires_grad



def test_backward_checks_grad_values_and_indices():
    # a direct call with indices past the support used to read past it (NaN) and write past grad_support
    query, support, weights = torch.randn(1, 4, 3), torch.randn(1, 2, 4, 5), torch.ones(1, 2, 5)
    values, idx = torch.ops.fsskern.max_cosine(query, support, weights, 1e-7)
    backward = torch.ops.fsskern._max_cosine_backward
    assert all(torch.isfinite(g).all() for g in backward(torch.ones_like(values), query, support, weights, idx, 1e-7))
    with pytest.raises(RuntimeError, match=r"indices must lie in \[-1, 5\)"):
        backward(torch.ones_like(values), query, support, weights, torch.full_like(idx, 5), 1e-7)
    with pytest.raises(RuntimeError, match=r"grad_values must be floating \(B, K, Nq\) = \[1, 2, 3\]"):
        backward(torch.ones(1), query, support, weights, idx, 1e-7)
    with pytest.raises(RuntimeError, match="indices must be int64"):
        backward(torch.ones_like(values), query, support, weights, idx.int(), 1e-7)

def test_zero_size_query():
    values, idx = ops.max_cosine(torch.randn(2, 4, 0), torch.randn(2, 3, 4, 5), torch.ones(2, 3, 5))
    assert values.shape == idx.shape == (2, 3, 0)
