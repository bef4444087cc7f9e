"""float16/bfloat16 inputs and torch.autocast: every op reads them as they are and computes in float32.

The tolerance: a kernel fed rounded inputs x16 is held to the float32 reference evaluated on x16.float(),
so the only error left is the output's one rounding to the inputs' dtype (unit roundoff u: 2^-8 for
bfloat16, 2^-11 for float16) on top of the float32 tolerance. Gradients go through the rounded output
(softmax backward's dO . O) before their own rounding, so they are held to 2u relative to their largest
entry. max_cosine returns float32 values, equal to the float32 kernel on the widened inputs within the
float32 tolerance; lsh_hash codes are those of x.float(), bit for bit.

The attention kernels' bf16 products (CPUs with AVX512-BF16; ``FSSKERN_BF16_DOT=0`` selects the widened
path) round the probabilities to bf16 once before multiplying the values: out_i may move by u * sum_j
a_ij |v_j| more, which is the attention of |v|. Both paths are tested where the CPU has both.
"""
import pytest
import torch
from torch.testing import assert_close

from conftest import FP32
from fsskern import build_info, ops, reference

ROUNDOFF = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}
REDUCED = list(ROUNDOFF)


def out_tol(dtype):
    return dict(rtol=ROUNDOFF[dtype] + FP32["rtol"], atol=FP32["atol"])


def assert_grads_close(got, want, dtype):
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_close(g.float(), w, rtol=ROUNDOFF[dtype], atol=2 * ROUNDOFF[dtype] * float(w.abs().max()) + 1e-6)


def rounded(*shapes, dtype):
    return [torch.randn(*s).to(dtype).requires_grad_() for s in shapes]


def widened(tensors):
    return [t.detach().float().requires_grad_() for t in tensors]


# ---- attention -----------------------------------------------------------------------------------

BF16_PRODUCTS = build_info()["bf16_attention"].startswith("bf16")


def attention_paths(dtype):
    """(dtype, products) pairs: every dtype on the widened path, bf16 also on the bf16 products."""
    return [(dtype, "widened")] + ([(dtype, "bf16")] if dtype == torch.bfloat16 else [])


PATHS = [p for dtype in REDUCED for p in attention_paths(dtype)]


@pytest.fixture
def products(request, monkeypatch):
    if request.param == "bf16" and not BF16_PRODUCTS:
        pytest.skip("no AVX512-BF16 on this CPU: the bf16 products do not run")
    if request.param == "widened":
        monkeypatch.setenv("FSSKERN_BF16_DOT", "0")
    return request.param


def assert_attention_close(out, want, want_of_abs_values, rtol, atol, products):
    """want_of_abs_values: the attention of |v| (sum_j a_ij |v_j|), the scale of the probabilities' rounding."""
    bound = rtol * want.abs() + atol
    if products == "bf16":
        bound = bound + ROUNDOFF[torch.bfloat16] * want_of_abs_values
    excess = (out.float() - want).abs() - bound
    assert excess.max() <= 0, f"beyond the bound by {excess.max():.3g}"


@pytest.mark.parametrize("dtype,products", PATHS, indirect=["products"], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 50, 8, 8, 7), (1, 1, 700, 16, 5, 600), (2, 2, 900, 33, 17, 1030)], ids=str)
def test_prototype_attention_reduced(dtype, products, shape):
    B, H, N, D, Dv, P = shape
    q, k, v = rounded((B, H, N, D), (B, H, P, D), (B, H, P, Dv), dtype=dtype)
    valid = torch.rand(B, P) < 0.8
    valid[:, 0] = True
    out, lse = torch.ops.fsskern.prototype_attention(q, k, v, valid, 0.3, 0.0, 0)
    assert out.dtype == dtype and lse.dtype == torch.float32
    wq, wk, wv = widened((q, k, v))
    want = reference.attention.prototype_attention(wq, wk, wv, valid, scale=0.3)
    of_abs = reference.attention.prototype_attention(wq, wk, wv.abs(), valid, scale=0.3).detach()
    assert_attention_close(out, want.detach(), of_abs, ROUNDOFF[dtype] + FP32["rtol"], FP32["atol"], products)
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v), grad.to(dtype))
    assert_grads_close(got, torch.autograd.grad(want, (wq, wk, wv), grad.to(dtype).float()), dtype)


@pytest.mark.parametrize("dtype,products", PATHS, indirect=["products"], ids=str)
@pytest.mark.parametrize("mode", ["exclude", "multiply"])
def test_local_attention_reduced(dtype, products, mode):
    query, support, value = rounded((2, 16, 300), (2, 16, 700), (2, 8, 700), dtype=dtype)
    mask = (torch.rand(2, 700) < 0.3).float()
    out = ops.local_conditional_attention(query, support, mask, value=value, mode=mode)
    assert out.dtype == dtype
    wq, ws, wv = widened((query, support, value))
    want = reference.attention.local_conditional_attention(wq, ws, mask, wv, mode)
    of_abs = reference.attention.local_conditional_attention(wq, ws, mask, wv.abs(), mode).detach()
    # "multiply" sums the background values in the inputs' dtype (one more rounding)
    atol = ROUNDOFF[dtype] if mode == "multiply" else 1e-5
    assert_attention_close(out, want.detach(), of_abs, 2 * ROUNDOFF[dtype], atol, products)
    grad = torch.randn_like(want)
    got = torch.autograd.grad(out, (query, support, value), grad.to(dtype))
    assert_grads_close(got, torch.autograd.grad(want, (wq, ws, wv), grad.to(dtype).float()), dtype)


def assert_products_match_widened(q, k, v, valid, scale, dropout_p):
    """prototype_attention on bf16 inputs with the bf16 products against the widened path on the same inputs:
    the output within the attention bound, the gradients within bf16 rounding. Returns both logsumexps."""
    args = (q, k, v, valid, scale, dropout_p, 5)
    out, lse = torch.ops.fsskern.prototype_attention(*args)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FSSKERN_BF16_DOT", "0")
        want, want_lse = torch.ops.fsskern.prototype_attention(*args)
        want_grads = torch.autograd.grad(want, (q, k, v), grad)
    of_abs = torch.ops.fsskern.prototype_attention(q, k, v.abs(), *args[3:])[0].float()
    assert_attention_close(out, want.float(), of_abs, 2 * ROUNDOFF[torch.bfloat16], 1e-5, "bf16")
    assert_grads_close(got, [g.float() for g in want_grads], torch.bfloat16)
    return lse, want_lse


@pytest.mark.parametrize("products", ["bf16"], indirect=True)
@pytest.mark.parametrize("keys", [1201, 301], ids=["key_tiles", "one_tile"])
@pytest.mark.parametrize("dropout", [0.2, 0.0], ids=["dropout", "no_dropout"])
def test_bf16_products_tiles_and_odd_sizes(products, keys, dropout):
    """Several key tiles (> 512 keys, so the running max rescales) or one, odd D, Dv and key counts,
    channels-first queries, the constant key, with dropout (the softmax in place, then packed) or without
    (bf16::exp_pairs packs the probabilities as it makes them), against the widened path on the same
    inputs. The logsumexp: float32 sums of exp within 3 ulp, so within float32 rounding of the widened one."""
    q, k, v = rounded((1, 2, 333, 7), (1, 2, keys, 7), (1, 2, keys, 5), dtype=torch.bfloat16)
    lse, want_lse = assert_products_match_widened(q, k, v, torch.rand(1, keys) < 0.9, 0.7, dropout)
    assert_close(lse, want_lse, rtol=1e-6, atol=1e-6)
    query, support = rounded((2, 9, 1100), (2, 9, keys + 99), dtype=torch.bfloat16)
    mask = (torch.rand(2, keys + 99) < 0.6).float()
    out = ops.local_conditional_attention(query, support, mask, mode="multiply")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FSSKERN_BF16_DOT", "0")
        want = ops.local_conditional_attention(query, support, mask, mode="multiply")
    of_abs = ops.local_conditional_attention(query, support, mask, value=support.abs(), mode="multiply")
    assert_attention_close(out, want.float(), of_abs.float(), 2 * ROUNDOFF[torch.bfloat16], 1e-5, "bf16")


@pytest.mark.parametrize("products", ["bf16"], indirect=True)
@pytest.mark.parametrize("count", [63, 70, 100], ids=["tail_block", "tail_on_vdp", "several_blocks"])
@pytest.mark.parametrize("rows,D", [(116, 40), (300, 64)], ids=["short", "whole_row_blocks"])
@pytest.mark.parametrize("dropout", [0.2, 0.0], ids=["dropout", "no_dropout"])
def test_bf16_products_blocks_and_their_edges(products, count, rows, D, dropout):
    """Shapes that split into the blocks of both AMX paths and their edges. With dropout (bf16::gemm's 32 x 32
    blocks): rows, keys and channels past the last whole block either the tail of one more block overlapping the
    one before (>= 16 of them: 116 rows, 63 keys, 100 keys) or left to vdpbf16ps (< 16: 70 keys, 36 value
    channels), and pairs past a multiple of 16 (D = 40). Without (the row-major path's blocks of 128 rows): a last
    block of 116 or 44 rows, key counts padded to 64, 96 and 128, channels zero-padded to 64 (D = 40, Dv = 36) or
    q's rows read as they lie (D = 64). Forward and gradients against the widened path on the same inputs: a block
    stored twice, an edge added twice or a padding that is not zero is far outside the tolerances. Without AMX
    the same shapes test the vdpbf16ps GEMM alone."""
    q, k, v = rounded((2, 2, rows, D), (2, 2, 100, D), (2, 2, 100, 36), dtype=torch.bfloat16)
    valid = torch.zeros(2, 100, dtype=torch.bool)
    valid[0, :count] = True
    valid[1, torch.randperm(100)[:count]] = True
    assert_products_match_widened(q, k, v, valid, 0.2, dropout)


@pytest.mark.parametrize("products", ["bf16"], indirect=True)
def test_bf16_products_row_tiles_rounded_to_blocks(products):
    """The row-major AMX path rounds its row tiles up to blocks of 128 rows and counts them again: 3,600 query rows
    (CRCNet's 60 x 60) against 300 keys make 9 tiles of 400 rows, 8 of 512 once rounded; counted before the
    rounding, a ninth started past the last row (a negative row count: a fill past its buffer). Without AMX the
    same shape tests the vdpbf16ps GEMM."""
    q, k, v = rounded((1, 1, 3600, 16), (1, 1, 300, 16), (1, 1, 300, 8), dtype=torch.bfloat16)
    assert_products_match_widened(q, k, v, torch.ones(1, 300, dtype=torch.bool), 0.25, 0.0)


@pytest.mark.parametrize("products", ["bf16"], indirect=True)
@pytest.mark.parametrize("D,Dv", [(0, 3), (6, 0), (0, 0)])
def test_bf16_products_zero_channels(products, D, Dv):
    """No channels on one side (D = 0: every score 0, uniform weights over the valid keys; Dv = 0: an empty
    output): the bf16 products give the widened path's outputs and gradients, as the float kernels do."""
    q, k, v = rounded((2, 2, 5, D), (2, 2, 4, D), (2, 2, 4, Dv), dtype=torch.bfloat16)
    valid = torch.tensor([[True, False, True, True], [True] * 4])
    out = ops.prototype_attention(q, k, v, key_valid=valid, scale=1.0)
    got = torch.autograd.grad(out.float().sum(), (q, k, v))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FSSKERN_BF16_DOT", "0")
        want = ops.prototype_attention(q, k, v, key_valid=valid, scale=1.0)
        want_grads = torch.autograd.grad(want.float().sum(), (q, k, v))
    assert out.shape == (2, 2, 5, Dv) and torch.equal(out, want)
    assert [g.shape for g in got] == [w.shape for w in want_grads]
    assert_grads_close([g for g in got if g.numel()], [w.float() for w in want_grads if w.numel()], torch.bfloat16)


@pytest.mark.parametrize("products", ["bf16"], indirect=True)
def test_bf16_products_nan_rows_and_minus_inf_keys(products):
    """A NaN query gives a NaN row and logsumexp; a key whose scores are -inf gets weight 0 (exp below -87
    is 0): the same as the widened path, the other rows finite and close."""
    q, k, v = (torch.randn(1, 1, 40, 6).bfloat16(), torch.randn(1, 1, 9, 6).bfloat16(),
               torch.randn(1, 1, 9, 4).bfloat16())
    q[..., 0] = q[..., 0].abs() + 0.1
    q[0, 0, 3, 1] = float("nan")
    k[0, 0, 2, 0] = -float("inf")  # every score of key 2 is -inf
    args = (q, k, v, None, 0.5, 0.0, 0)
    out, lse = torch.ops.fsskern.prototype_attention(*args)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FSSKERN_BF16_DOT", "0")
        want, want_lse = torch.ops.fsskern.prototype_attention(*args)
        of_abs = torch.ops.fsskern.prototype_attention(q, k, v.abs(), None, 0.5, 0.0, 0)[0].float()
    assert torch.equal(out.isnan(), want.isnan()) and torch.equal(lse.isnan(), want_lse.isnan())
    assert out[0, 0, 3].isnan().all() and out.isnan().sum() == out.shape[-1]
    # the NaN row's probabilities are NaN in the backward too: it poisons dK and dV as on the widened path
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    got = torch.autograd.grad(torch.ops.fsskern.prototype_attention(*leaves, *args[3:])[0].float().sum(), leaves)
    with pytest.MonkeyPatch.context() as m:
        m.setenv("FSSKERN_BF16_DOT", "0")
        want_grads = torch.autograd.grad(torch.ops.fsskern.prototype_attention(*leaves, *args[3:])[0].float().sum(),
                                         leaves)
    assert all(torch.equal(g.isnan(), w.isnan()) for g, w in zip(got, want_grads))
    assert got[1].isnan().all() and got[2].isnan().all()
    rows = ~want.isnan()
    assert_attention_close(out[rows], want[rows].float(), of_abs[rows], 2 * ROUNDOFF[torch.bfloat16], 1e-5, "bf16")
    assert_close(lse, want_lse, equal_nan=True, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("products", ["bf16"], indirect=True)
@pytest.mark.parametrize("dropout", [0.1, 0.0], ids=["dropout", "no_dropout"])
def test_bf16_products_repeat_exactly_across_threads(products, dropout):
    """The bf16 products sum in an order set by the tiles alone: outputs and gradients equal bit for bit."""
    q, k, v = rounded((2, 2, 700, 12), (2, 2, 70, 12), (2, 2, 70, 6), dtype=torch.bfloat16)
    grad = torch.randn(2, 2, 700, 6).bfloat16()
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = ops.prototype_attention(q, k, v, dropout_p=dropout, seed=3)
            results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_attention_float32_accumulation_beats_computing_in_bfloat16():
    q, k, v = (torch.randn(1, 2, 400, 64).bfloat16() for _ in range(3))
    truth = reference.attention.prototype_attention(q.double(), k.double(), v.double(), None, scale=0.125)
    ours = ops.prototype_attention(q, k, v, scale=0.125).double()
    in_bf16 = reference.attention.prototype_attention(q, k, v, None, scale=0.125).double()
    assert (ours - truth).abs().max() < 0.5 * (in_bf16 - truth).abs().max()


@pytest.mark.parametrize("dtype", REDUCED)
def test_attention_under_autocast(dtype):
    q, k, v = torch.randn(2, 2, 30, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 4)
    with torch.autocast("cpu", dtype=dtype):
        out = ops.prototype_attention(q, k, v)
        local = ops.local_conditional_attention(q[:, 0].transpose(1, 2), k[:, 0].transpose(1, 2),
                                                torch.ones(2, 9), mode="multiply")
    assert out.dtype == dtype and local.dtype == dtype
    assert torch.equal(out, ops.prototype_attention(q.to(dtype), k.to(dtype), v.to(dtype)))
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    with torch.autocast("cpu", dtype=dtype):  # the other reduced dtype is cast too, as autocast casts a matmul's
        mixed = ops.prototype_attention(q, k.to(other), v.to(other))
    assert mixed.dtype == dtype
    assert torch.equal(mixed, ops.prototype_attention(q.to(dtype), k.to(other).to(dtype), v.to(other).to(dtype)))
    float64 = q.double()
    with torch.autocast("cpu", dtype=dtype):  # autocast leaves float64 alone
        assert ops.prototype_attention(float64, k.double(), v.double()).dtype == torch.float64


def test_attention_reduced_opcheck():
    q, k, v = (t.detach() for t in rounded((1, 2, 20, 8), (1, 2, 5, 8), (1, 2, 5, 4), dtype=torch.bfloat16))
    torch.library.opcheck(torch.ops.fsskern.prototype_attention.default, (q, k, v, None, 0.5, 0.0, 0))
    query, support = torch.randn(1, 8, 20).half(), torch.randn(1, 8, 12).half()
    torch.library.opcheck(torch.ops.fsskern.local_conditional_attention.default,
                          (query, support, torch.ones(1, 12), support, "exclude"))


# ---- max_cosine / prior_mask ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", REDUCED)
def test_max_cosine_reduced(dtype):
    q, s = rounded((2, 64, 300), (2, 3, 64, 200), dtype=dtype)
    w = (torch.rand(2, 3, 200) < 0.5).to(dtype)
    values, idx = ops.max_cosine(q, s, w)
    assert values.dtype == torch.float32
    wq, ws = widened((q, s))
    want, want_idx = ops.max_cosine(wq, ws, w.float())
    assert_close(values, want, **FP32)
    assert torch.equal(idx, want_idx)
    grad = torch.randn_like(want)
    got = torch.autograd.grad(values, (q, s), grad)
    assert_grads_close(got, torch.autograd.grad(want, (wq, ws), grad), dtype)


def test_prior_mask_reduced_and_autocast():
    q, s = torch.randn(2, 32, 13, 11).relu(), torch.randn(2, 2, 32, 9, 9).relu()
    m = (torch.rand(2, 2, 40, 40) < 0.4).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prior = ops.prior_mask(q, s, m, out_size=(20, 20))
    assert prior.dtype == torch.float32  # as autocast's cosine_similarity
    want = ops.prior_mask(q.bfloat16().float(), s.bfloat16().float(), m, out_size=(20, 20))
    assert_close(prior, want, **FP32)
    got = ops.prior_mask(q.bfloat16(), s.bfloat16(), m, out_size=(20, 20))
    assert got.dtype == torch.float32 and torch.equal(got, prior)



def test_reductions_take_no_autocast_rule():
    # masked_average_pool, class_prototypes and cluster_means are averages: as autocast's own reductions (sum,
    # mean) they read features in the dtype they arrive, float32 staying float32 (DEVELOPERS.md, Conventions)
    f, masks = torch.randn(2, 8, 6, 6), (torch.rand(2, 3, 11, 11) > 0.5).float()
    labels, assign = torch.randint(0, 3, (2, 11, 11)), torch.randint(-1, 4, (2, 36))
    calls = [lambda: ops.masked_average_pool(f, masks), lambda: ops.class_prototypes(f, labels, 3)[0],
             lambda: ops.cluster_means(f.flatten(2).transpose(1, 2), assign, 4)[0]]
    for call in calls:
        want = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call()
        assert got.dtype == torch.float32 and torch.equal(got, want)

def test_max_cosine_reduced_opcheck():
    q, s, w = torch.randn(1, 8, 20).bfloat16(), torch.randn(1, 2, 8, 10).bfloat16(), torch.ones(1, 2, 10).bfloat16()
    torch.library.opcheck(torch.ops.fsskern.max_cosine.default, (q, s, w, 1e-7))


# ---- lsh_hash ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", REDUCED)
def test_lsh_hash_reduced_equals_widened(dtype):
    planes = ops.lsh_planes(40, 32)
    x = torch.randn(3, 257, 32).to(dtype)
    assert torch.equal(ops.lsh_hash(x, planes), ops.lsh_hash(x.float(), planes))
    maps = torch.randn(2, 32, 9, 13).to(dtype)  # channel-first maps, read in place
    tokens = maps.flatten(-2).transpose(-1, -2)
    assert torch.equal(ops.lsh_hash(tokens, planes), ops.lsh_hash(tokens.float(), planes))
    with torch.autocast("cpu", dtype=dtype):  # the planes stay float32
        assert torch.equal(ops.lsh_hash(x.float(), planes), ops.lsh_hash(x, planes))
    torch.library.opcheck(torch.ops.fsskern.lsh_hash.default, (x, planes))


@pytest.mark.skipif(not build_info()["bf16_attention"].startswith("bf16 products (AMX"),
                    reason="the tile units' path (AMX-BF16 CPUs)")
def test_bf16_products_on_amx_keep_few_compiled_shapes():
    # oneDNN keeps a compiled kernel (~0.5 MB) per brgemm shape; key counts that change from call to call must not
    # make new ones (as brgemm called with the kernels' own shapes did: +652 MB over 600 counts)
    import resource
    g = torch.Generator().manual_seed(0)
    B, H, N, D, P = 2, 2, 300, 32, 700
    q, k, v = (torch.randn(B, H, n, D, generator=g).bfloat16().requires_grad_() for n in (N, P, P))

    def call(count):
        valid = torch.zeros(B, P, dtype=torch.bool)
        valid[:, :count] = True
        ops.prototype_attention(q, k, v, key_valid=valid).float().sum().backward()

    for count in range(100, 110):
        call(count)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for count in range(110, 700, 3):
        call(count)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 64, f"{grown_mb:.0f} MB over 197 key counts"
