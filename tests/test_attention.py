"""prototype_attention (UMTFSS) and local_conditional_attention (CRCNet) against their
references: values, gradients, dropout, edge cases, bad inputs, opcheck and torch.compile."""
import pytest
import torch
from torch.testing import assert_close

from conftest import FP32, tol
from fsskern import nn as fnn
from fsskern import ops, reference

ref = reference.attention


def random_valid(B, P, p=0.7):
    valid = torch.rand(B, P) < p
    valid[:, 0] = True
    return valid


# ---- prototype_attention ---------------------------------------------------------------------

# (B, H, N, D, Dv, P): P = 1, the UMTFSS size of 70, and 600 > the 512-key tile (online
# rescaling across key tiles); N not a multiple of any tile.
PROTO_SHAPES = [(2, 3, 50, 8, 8, 7), (1, 2, 17, 4, 6, 1), (2, 8, 130, 32, 32, 70), (1, 1, 2500, 16, 5, 600)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", PROTO_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prototype_attention_matches_umtfss(dtype, shape):
    B, H, N, D, Dv, P = shape
    q, k, v = torch.randn(B, H, N, D, dtype=dtype), torch.randn(B, H, P, D, dtype=dtype), \
        torch.randn(B, H, P, Dv, dtype=dtype)
    valid = random_valid(B, P)
    assert_close(ops.prototype_attention(q, k, v, key_valid=valid), ref.prototype_attention(q, k, v, valid),
                 **tol(dtype))
    assert_close(ops.prototype_attention(q, k, v, scale=0.7), ref.prototype_attention(q, k, v, scale=0.7),
                 **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_prototype_attention_all_keys_invalid_gives_zero(dtype):
    q = torch.randn(2, 2, 9, 4, dtype=dtype, requires_grad=True)
    k, v = torch.randn(2, 2, 5, 4, dtype=dtype), torch.randn(2, 2, 5, 3, dtype=dtype)
    valid = random_valid(2, 5)
    valid[1] = False
    out = ops.prototype_attention(q, k, v, key_valid=valid)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    expected = ref.prototype_attention(q.float(), k.float(), v.float(), valid)[0]
    assert_close(out[0].float(), expected, **(FP32 if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)))
    # grad_q comes back uninitialised from the allocator and the kernels write every row, those without keys
    # too: NaNs of its size, freed on the heap just before, make a row left unwritten show.
    poison = torch.full_like(q, float("nan"))
    del poison
    out.sum().backward()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    # No keys at all is the same case.
    assert torch.equal(ops.prototype_attention(q, k[:, :, :0], v[:, :, :0]), torch.zeros(2, 2, 9, 3, dtype=dtype))


def test_prototype_attention_gradcheck():
    q = torch.randn(2, 2, 11, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 6, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    valid = random_valid(2, 6)
    assert torch.autograd.gradcheck(lambda q, k, v: ops.prototype_attention(q, k, v, key_valid=valid), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda q, k, v: ops.prototype_attention(q, k, v, key_valid=valid, dropout_p=0.3, seed=3), (q, k, v))


def test_prototype_attention_gradients_match_reference_across_key_tiles():
    q = torch.randn(1, 2, 300, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 700, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 700, 5, dtype=torch.float64, requires_grad=True)
    valid = random_valid(1, 700, p=0.9)
    assert valid.sum() > 512  # the kernel tiles the valid keys only: more than one tile of them
    grad = torch.randn(1, 2, 300, 5, dtype=torch.float64)
    got = torch.autograd.grad(ops.prototype_attention(q, k, v, key_valid=valid), (q, k, v), grad)
    want = torch.autograd.grad(ref.prototype_attention(q, k, v, valid), (q, k, v), grad)
    for g, w in zip(got, want):
        assert_close(g, w, **tol(torch.float64))


def dropout_keep_mask(B, H, N, P, p, seed):
    """The keep mask fsskern draws, read back through the op itself: with q = 0 every weight is
    1/P, and with one-hot values output (i, j) is keep_ij / ((1 - p) P)."""
    out = ops.prototype_attention(torch.zeros(B, H, N, 1, dtype=torch.float64), torch.zeros(B, H, P, 1, dtype=torch.float64),
                                  torch.eye(P, dtype=torch.float64).expand(B, H, P, P), dropout_p=p, seed=seed)
    keep = out * (1 - p) * P
    assert torch.all((keep - keep.round()).abs() < 1e-9)
    return keep.round().bool()


def test_dropout_matches_reference_with_the_same_mask():
    B, H, N, P, p = 2, 3, 40, 9, 0.25
    keep = dropout_keep_mask(B, H, N, P, p, seed=123)
    assert 0.6 < keep.double().mean() < 0.9
    q, k, v = torch.randn(B, H, N, 8, dtype=torch.float64, requires_grad=True), \
        torch.randn(B, H, P, 8, dtype=torch.float64, requires_grad=True), \
        torch.randn(B, H, P, 4, dtype=torch.float64, requires_grad=True)
    valid = random_valid(B, P)
    got = ops.prototype_attention(q, k, v, key_valid=valid, dropout_p=p, seed=123)
    want = ref.prototype_attention(q, k, v, valid, dropout_p=p, dropout_keep=keep)
    assert_close(got, want, **tol(torch.float64))
    grad = torch.randn_like(got)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), grad), torch.autograd.grad(want, (q, k, v), grad)):
        assert_close(g, w, **tol(torch.float64))


def test_dropout_seeds():
    q, k, v = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
    a = ops.prototype_attention(q, k, v, dropout_p=0.1, seed=1)
    assert torch.equal(a, ops.prototype_attention(q, k, v, dropout_p=0.1, seed=1))
    assert not torch.equal(a, ops.prototype_attention(q, k, v, dropout_p=0.1, seed=2))
    torch.manual_seed(5)
    b = ops.prototype_attention(q, k, v, dropout_p=0.1)
    torch.manual_seed(5)
    assert torch.equal(b, ops.prototype_attention(q, k, v, dropout_p=0.1))
    # Unbiased: the mean over many seeds approaches the output without dropout.
    mean = torch.stack([ops.prototype_attention(q, k, v, dropout_p=0.5, seed=s) for s in range(400)]).mean(0)
    exact = ops.prototype_attention(q, k, v)
    assert (mean - exact).abs().mean() < 0.05 * exact.abs().mean()


def test_dropout_keep_rate():
    keep = dropout_keep_mask(1, 4, 500, 50, 0.3, seed=9)
    assert abs(keep.double().mean().item() - 0.7) < 0.01


def test_prototype_attention_non_contiguous_and_nan():
    q = torch.randn(2, 20, 3, 8).transpose(1, 2)  # (B, H, N, D) with N and H swapped in memory
    k = torch.randn(2, 3, 8, 6).transpose(2, 3)
    v = torch.randn(2, 3, 6, 5)[..., ::1]
    assert_close(ops.prototype_attention(q, k, v), ref.prototype_attention(q, k, v), **FP32)
    q = q.contiguous()
    q[0, 1, 4, 2] = float("nan")  # a NaN query gives a NaN row, as in the reference
    out = ops.prototype_attention(q, k, v)
    assert_close(out, ref.prototype_attention(q, k, v), equal_nan=True, **FP32)
    assert out[0, 1, 4].isnan().all() and not out[0, 1, 3].isnan().any()
    # scale 0: BLAS skips a product scaled by 0, which used to turn the NaN row into the uniform average
    out = ops.prototype_attention(q, k, v, scale=0.0)
    assert_close(out, ref.prototype_attention(q, k, v, scale=0.0), equal_nan=True, **FP32)
    assert out[0, 1, 4].isnan().all() and not out[0, 1, 3].isnan().any()
    # and its backward: the NaN reaches the gradients of q and k, as autograd's (alpha 0 had made them 0)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    got = torch.autograd.grad(ops.prototype_attention(q, k, v, scale=0.0).sum(), (q, k, v))
    want = torch.autograd.grad(ref.prototype_attention(q, k, v, scale=0.0).sum(), (q, k, v))
    for g, w in zip(got, want):
        assert_close(g, w, equal_nan=True, **FP32)
    assert got[0].isnan().any() and got[1].isnan().any()


def test_attention_never_reads_what_is_masked_out():
    """NaN/Inf in an invalid key or value, or in a support pixel outside the foreground, does not reach the output:
    the kernels never visit them. The references do reach them (NaN - 10000, or a weight 0 times NaN, is NaN); the
    README lists this exception."""
    q, k, v = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 3)
    valid = torch.tensor([[True, True, True, True, False, True]])
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[..., 4, 0], v_bad[..., 4, 1] = float("nan"), float("inf")
    out = ops.prototype_attention(q, k_bad, v_bad, key_valid=valid)
    assert torch.equal(out, ops.prototype_attention(q, k, v, key_valid=valid))
    assert ref.prototype_attention(q, k_bad, v_bad, key_valid=valid).isnan().any()  # the documented difference
    query, support, value = torch.randn(1, 3, 7), torch.randn(1, 3, 9), torch.randn(1, 2, 9)
    mask = (torch.arange(9) < 5).float()[None]
    support_bad, value_bad = support.clone(), value.clone()
    support_bad[0, 1, 7], value_bad[0, 0, 8] = float("nan"), float("inf")
    for mode, bad in (("exclude", (support_bad, value_bad)), ("multiply", (support_bad, value))):
        out = ops.local_conditional_attention(query, bad[0], mask, value=bad[1], mode=mode)
        assert torch.equal(out, ops.local_conditional_attention(query, support, mask, value=value, mode=mode))
        assert ref.local_conditional_attention(query, bad[0], mask, bad[1], mode).isnan().any()
    # "multiply" gives the background its weight, so its values do count: an Inf there reaches every row
    assert ops.local_conditional_attention(query, support, mask, value=value_bad, mode="multiply")[0, 0].isinf().all()


def test_prototype_attention_deterministic_across_threads():
    q, k, v = torch.randn(2, 4, 900, 16), torch.randn(2, 4, 70, 16), torch.randn(2, 4, 70, 16)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, threads, 2):
            torch.set_num_threads(n)
            outs.append(ops.prototype_attention(q, k, v, dropout_p=0.1, seed=4))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs)


def _with_threads(n, fn):
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(n)
        return fn()
    finally:
        torch.set_num_threads(previous)


# One task (B * H = 1, one row tile): the kernels ran their GEMMs outside a parallel region, where MKL may
# thread them and sum in another order (results differed by ~1e-5 between 1 and 2 threads on some CPUs).
@pytest.mark.parametrize("shape", [(1, 1, 300, 256, 70), (1, 1, 64, 2048, 70), (2, 4, 900, 16, 70)],
                         ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_do_not_depend_on_thread_count(shape):
    B, H, N, D, P = shape
    q, k, v = (torch.randn(B, H, n, D, requires_grad=True) for n in (N, P, P))
    query, support = torch.randn(B, D, N, requires_grad=True), torch.randn(B, D, 4 * P, requires_grad=True)
    mask = torch.rand(B, 4 * P) < 0.4

    def run():
        outs = [ops.prototype_attention(q, k, v, dropout_p=0.1, seed=3),
                ops.local_conditional_attention(query, support, mask, mode="multiply")]
        weights = [torch.linspace(-1, 1, o.numel()).view_as(o) for o in outs]
        grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), (q, k, v, query, support))
        return [o.detach() for o in outs] + list(grads)

    one = _with_threads(1, run)
    for n in (2, 4):
        assert all(torch.equal(a, b) for a, b in zip(one, _with_threads(n, run)))


def test_prototype_attention_zero_size():
    assert ops.prototype_attention(torch.randn(2, 3, 0, 4), torch.randn(2, 3, 5, 4),
                                   torch.randn(2, 3, 5, 2)).shape == (2, 3, 0, 2)
    assert ops.prototype_attention(torch.randn(0, 3, 7, 4), torch.randn(0, 3, 5, 4),
                                   torch.randn(0, 3, 5, 2)).shape == (0, 3, 7, 2)


def test_zero_channel_gradients():
    # D = 0 (C = 0 for CRCNet's op): every score is 0, so the weights are uniform over the valid keys and the
    # values still get a gradient; the backward used to be skipped (q.numel() == 0) and return zeros.
    f64 = dict(dtype=torch.float64, requires_grad=True)
    q, k, v = torch.randn(2, 2, 5, 0, **f64), torch.randn(2, 2, 4, 0, **f64), torch.randn(2, 2, 4, 3, **f64)
    valid = torch.tensor([[True, False, True, True], [True, True, True, True]])
    op = lambda q, k, v: ops.prototype_attention(q, k, v, key_valid=valid, scale=1.0)  # noqa: E731
    assert torch.autograd.gradcheck(op, (q, k, v))
    grad_v = torch.autograd.grad(op(q, k, v).sum(), v)[0]
    assert_close(grad_v, torch.autograd.grad(ref.prototype_attention(q, k, v, valid, scale=1.0).sum(), v)[0])
    assert grad_v.abs().sum() > 0
    assert ops.prototype_attention(q, k, v[..., :0], scale=1.0).shape == (2, 2, 5, 0)  # D = Dv = 0
    for mode in ("exclude", "multiply"):
        query, support, value = torch.randn(2, 0, 6, **f64), torch.randn(2, 0, 5, **f64), torch.randn(2, 3, 5, **f64)
        mask = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
        local = lambda a, b, c: ops.local_conditional_attention(a, b, mask, value=c, mode=mode)  # noqa: E731
        assert torch.autograd.gradcheck(local, (query, support, value))
        grad_value = torch.autograd.grad(local(query, support, value).sum(), value)[0]
        want = torch.autograd.grad(ref.local_conditional_attention(query, support, mask, value, mode).sum(), value)[0]
        assert_close(grad_value, want)
        assert grad_value.abs().sum() > 0


def test_prototype_attention_bad_inputs():
    q, k, v = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 6)
    with pytest.raises(RuntimeError, match="must be 4-d"):
        ops.prototype_attention(q[0], k, v)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        ops.prototype_attention(q.int(), k.int(), v.int())
    with pytest.raises(RuntimeError, match="must have the dtype of q"):
        ops.prototype_attention(q.bfloat16(), k, v)
    with pytest.raises(RuntimeError, match="must have the dtype of q"):
        ops.prototype_attention(q, k.double(), v)
    with pytest.raises(RuntimeError, match="must share D"):
        ops.prototype_attention(q, k[..., :3], v)
    with pytest.raises(RuntimeError, match="same number of keys"):
        ops.prototype_attention(q, k, v[:, :, :4])
    with pytest.raises(RuntimeError, match="must share \\(B, H\\)"):
        ops.prototype_attention(q, k[:1], v[:1])
    with pytest.raises(RuntimeError, match="key_valid must be bool"):
        ops.prototype_attention(q, k, v, key_valid=torch.ones(2, 5))
    with pytest.raises(RuntimeError, match=r"key_valid must be \(B, P\) = \(2, 5\)"):
        ops.prototype_attention(q, k, v, key_valid=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        ops.prototype_attention(q, k, v, dropout_p=1.0)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        ops.prototype_attention(q, k, v, scale=float("inf"))
    # these used to raise ZeroDivisionError / the dispatcher's "Expected a value of type 'int'"
    with pytest.raises(ValueError, match="prototype_attention: the default scale .* needs D >= 1"):
        ops.prototype_attention(q[..., :0], k[..., :0], v)
    with pytest.raises(ValueError, match="prototype_attention: seed must fit in int64"):
        ops.prototype_attention(q, k, v, dropout_p=0.1, seed=2 ** 63)
    with pytest.raises(ValueError, match=r"PrototypeCrossAttention: expected x \(B, N, dim\)"):
        fnn.PrototypeCrossAttention(8, heads=2)(torch.randn(4, 8), torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match=r"valid must be a bool \(B, P\) = \(1, 3\) tensor"):  # was bitwise_or_cpu
        fnn.PrototypeCrossAttention(8, heads=2)(torch.randn(1, 4, 8), torch.randn(1, 3, 8), torch.ones(1, 3))


def test_prototype_attention_opcheck():
    q, k, v = torch.randn(2, 2, 9, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 3)
    op = torch.ops.fsskern.prototype_attention.default
    torch.library.opcheck(op, (q, k, v, random_valid(2, 5), 0.5, 0.0, 0))
    torch.library.opcheck(op, (q.double().requires_grad_(), k.double().requires_grad_(), v.double().requires_grad_(),
                               None, 0.5, 0.2, 7))


# ---- PrototypeCrossAttention ---------------------------------------------------------------------

def umtfss_layer(layer, x, prototypes, valid):
    """The layer as UMTFSS writes it, with the fsskern layer's weights."""
    B, N, dim = x.shape
    H = layer.heads
    split = lambda t: t.view(B, -1, H, dim // H).transpose(1, 2)  # noqa: E731
    q, k, v = split(layer.to_q(x)), split(layer.to_k(prototypes)), split(layer.to_v(prototypes))
    out = ref.prototype_attention(q, k, v, valid)
    return layer.to_out(out.transpose(1, 2).reshape(B, N, dim))


def test_prototype_cross_attention_module_and_compile():
    torch._dynamo.reset()
    layer = fnn.PrototypeCrossAttention(32, heads=4, dropout=0.1).eval()
    x, prototypes, valid = torch.randn(2, 45, 32, requires_grad=True), torch.randn(2, 7, 32), random_valid(2, 7)
    out = layer(x, prototypes, valid)
    assert_close(out, umtfss_layer(layer, x, prototypes, valid), **FP32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, prototypes, valid), out, **FP32)
    grad = torch.autograd.grad(compiled(x, prototypes, valid).sum(), x)[0]
    assert_close(grad, torch.autograd.grad(out.sum(), x)[0], **FP32)
    # Training: dropout on the weights and after the projection; compiles (the seed is drawn
    # eagerly) and trains.
    layer.train()
    train_out = torch.compile(layer, backend="aot_eager")(x, prototypes, valid)
    train_out.sum().backward()
    assert layer.to_q.weight.grad is not None and not torch.equal(train_out, out)


# ---- local_conditional_attention -----------------------------------------------------------------

# (B, C, Nq, Ns, Cv): Nq/Ns not multiples of anything; the second has more foreground pixels than the 512-key
# tile (the kernel packs and visits only those), in image 1, beside image 0 without foreground.
LOCAL_SHAPES = [(2, 6, 40, 33, 4), (2, 16, 300, 1100, 16), (3, 1, 7, 5, 2)]


def local_mask(B, Ns):
    """A 0/1 support mask: image 0 without foreground, the others 60 % foreground (about 660 of 1,100 pixels: more
    than a key tile), and for B > 2 image 1 without background."""
    mask = (torch.rand(B, Ns) < 0.6).float()
    mask[0] = 0
    if B > 2:
        mask[1] = 1
    return mask


@pytest.mark.parametrize("mode", ["exclude", "multiply"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", LOCAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_local_attention_matches_crcnet(mode, dtype, shape):
    B, C, Nq, Ns, Cv = shape
    query, support = torch.randn(B, C, Nq, dtype=dtype), torch.randn(B, C, Ns, dtype=dtype)
    value = torch.randn(B, Cv, Ns, dtype=dtype)
    mask = local_mask(B, Ns)
    assert mask[0].sum() == 0 and mask[1].sum() > (512 if Ns > 512 else 0)
    assert_close(ops.local_conditional_attention(query, support, mask, value=value, mode=mode),
                 ref.local_conditional_attention(query, support, mask, value, mode), **tol(dtype))
    assert_close(ops.local_conditional_attention(query, support, mask.bool(), mode=mode),
                 ref.local_conditional_attention(query, support, mask, None, mode), **tol(dtype))


def test_local_attention_empty_foreground():
    query, support = torch.randn(2, 4, 10), torch.randn(2, 4, 12)
    mask = torch.zeros(2, 12)
    assert torch.equal(ops.local_conditional_attention(query, support, mask), torch.zeros(2, 4, 10))
    # Multiply mode: every logit is 0, so each query pixel gets the mean support feature.
    out = ops.local_conditional_attention(query, support, mask, mode="multiply")
    assert_close(out, support.mean(-1, keepdim=True).expand(2, 4, 10), **FP32)


@pytest.mark.parametrize("mode", ["exclude", "multiply"])
def test_local_attention_gradcheck(mode):
    query = torch.randn(2, 3, 10, dtype=torch.float64, requires_grad=True)
    support = torch.randn(2, 3, 9, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 2, 9, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 9) < 0.4
    mask[1, :2] = True
    assert torch.autograd.gradcheck(
        lambda q, s, v: ops.local_conditional_attention(q, s, mask, value=v, mode=mode), (query, support, value))
    assert torch.autograd.gradcheck(lambda q, s: ops.local_conditional_attention(q, s, mask, mode=mode),
                                    (query, support))


@pytest.mark.parametrize("mode", ["exclude", "multiply"])
def test_local_attention_gradients_match_reference(mode):
    query = torch.randn(2, 8, 200, dtype=torch.float64, requires_grad=True)
    support = torch.randn(2, 8, 700, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(2, 700) < 0.8).float()
    grad = torch.randn(2, 8, 200, dtype=torch.float64)
    got = torch.autograd.grad(ops.local_conditional_attention(query, support, mask, mode=mode), (query, support), grad)
    want = torch.autograd.grad(ref.local_conditional_attention(query, support, mask, None, mode), (query, support), grad)
    for g, w in zip(got, want):
        assert_close(g, w, **tol(torch.float64))


def test_local_attention_bad_inputs():
    query, support, mask = torch.randn(2, 4, 10), torch.randn(2, 4, 12), torch.ones(2, 12)
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.local_conditional_attention(query, support, mask, mode="add")
    with pytest.raises(RuntimeError, match="must be 3-d"):
        ops.local_conditional_attention(query[0], support, mask)
    with pytest.raises(RuntimeError, match="channel counts differ"):
        ops.local_conditional_attention(query[:, :3], support, mask)
    with pytest.raises(RuntimeError, match="batch sizes differ"):
        ops.local_conditional_attention(query[:1], support, mask)
    with pytest.raises(RuntimeError, match=r"support_mask must be \(B, Ns\) = \(2, 12\)"):
        ops.local_conditional_attention(query, support, mask[:, :5])
    with pytest.raises(RuntimeError, match="only 0 and 1"):
        ops.local_conditional_attention(query, support, mask * 0.5)
    with pytest.raises(RuntimeError, match="only 0 and 1"):
        ops.local_conditional_attention(query, support, mask * float("nan"))
    with pytest.raises(RuntimeError, match="value must have the support's 12 pixels"):
        ops.local_conditional_attention(query, support, mask, value=torch.randn(2, 3, 11))
    with pytest.raises(RuntimeError, match="must have the dtype of query"):
        ops.local_conditional_attention(query, support.double(), mask)
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        ops.local_conditional_attention(query.long(), support.long(), mask)



def test_backward_ops_check_their_extra_inputs():
    # Autograd passes the forward's own outputs; direct calls with others used to read past lse / grad_out (NaN).
    q, k, v = (torch.randn(1, 1, n, 32).bfloat16() for n in (64, 8, 8))
    out, lse = torch.ops.fsskern.prototype_attention(q, k, v, None, 1.0, 0.0, 0)
    backward = torch.ops.fsskern._prototype_attention_backward
    assert all(torch.isfinite(g).all() for g in backward(torch.ones_like(out), q, k, v, None, out, lse, 1.0, 0.0, 0))
    with pytest.raises(RuntimeError, match=r"_prototype_attention_backward: lse must be Float \[1, 1, 64\]"):
        backward(torch.ones_like(out), q, k, v, None, out, lse[..., :1], 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="_prototype_attention_backward: grad_out must be BFloat16"):
        backward(torch.ones_like(out)[:, :, :1], q, k, v, None, out, lse, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="_prototype_attention_backward: out must be BFloat16"):
        backward(torch.ones_like(out), q, k, v, None, out.float(), lse, 1.0, 0.0, 0)
    query, support, mask = torch.randn(1, 6, 16), torch.randn(1, 6, 9), torch.ones(1, 9)
    out, lse = torch.ops.fsskern.local_conditional_attention(query, support, mask, support, "exclude")
    backward = torch.ops.fsskern._local_conditional_attention_backward
    with pytest.raises(RuntimeError, match=r"_local_conditional_attention_backward: lse must be Float \[1, 16\]"):
        backward(torch.ones_like(out), query, support, mask, support, out, lse[:, :1], "exclude")
    with pytest.raises(RuntimeError, match=r"_local_conditional_attention_backward: out must be Float \[1, 6, 16\]"):
        backward(torch.ones_like(out), query, support, mask, support, out[..., :1], lse, "exclude")


def test_fake_checks_the_key_valid_device():
    # a meta key_valid beside CPU q, k, v dispatched to the fake, which returned CPU tensors of garbage
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(RuntimeError, match="prototype_attention: all inputs must be on one device"):
        torch.ops.fsskern.prototype_attention(q, k, v, torch.ones(1, 5, dtype=torch.bool, device="meta"), 1.0, 0.0, 0)

def test_local_attention_opcheck():
    query, support, value = torch.randn(2, 4, 10), torch.randn(2, 4, 12), torch.randn(2, 3, 12)
    mask = (torch.rand(2, 12) < 0.5).float()
    op = torch.ops.fsskern.local_conditional_attention.default
    for mode in ("exclude", "multiply"):
        torch.library.opcheck(op, (query, support, mask, value, mode))
        torch.library.opcheck(op, (query.double().requires_grad_(), support.double().requires_grad_(),
                                   mask.bool(), value.double().requires_grad_(), mode))
