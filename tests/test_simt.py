"""Every CUDA kernel of fsskern, executed on the CPU by the SIMT emulation harness (csrc/simt),
against the references and the CPU kernels with the CPU kernels' tolerances, under several
thread schedules; and proof that the harness catches the classic kernel bugs.

Run only this suite with `pytest -m simt`.
"""
import re
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from conftest import FP32, rounded_once, tol
from fsskern import reference
from simt_build import CSRC, load_simt

pytestmark = pytest.mark.simt

SCHEDULES = [("in_order", 0), ("reversed", 0), ("random", 7)]


@pytest.fixture(scope="module")
def simt():
    return load_simt()


@pytest.fixture(params=SCHEDULES, ids=[s for s, _ in SCHEDULES])
def schedule(request, simt):
    name, seed = request.param
    simt._simt_set_schedule(name, seed)
    yield name
    simt._simt_set_schedule("in_order", 0)


# ---- masked_average_pool: resample (both directions) / weighted_sum kernels ---------------------

# (B, N, C, h, w, H, W): C = 13 leaves a partial block of warps (8 channels per block); masks
# larger and smaller than the features exercise both resampling directions; 53x53 <- 417 takes
# several blocks of the grid-stride resampling kernels.
MAP_SHAPES = [(2, 3, 13, 9, 11, 30, 25), (1, 2, 8, 12, 10, 6, 7), (5, 1, 3, 53, 53, 417, 417)]


@pytest.mark.parametrize("mode", ["mask", "features"])
@pytest.mark.parametrize("shape", MAP_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_masked_average_pool_forward(simt, schedule, mode, shape):
    B, N, C, h, w, H, W = shape
    features = torch.randn(B, C, h, w)
    masks = torch.rand(B, N, H, W)
    protos, area = simt.masked_average_pool(features, masks, mode, 1e-3)
    assert_close(protos, reference.masked_average_pool(features, masks, mode, 1e-3), **FP32)
    cpu_protos, cpu_area = torch.ops.fsskern.masked_average_pool(features, masks, mode, 1e-3)
    assert_close(protos, cpu_protos, **FP32)
    assert_close(area, cpu_area, **FP32)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_masked_average_pool_dtypes(simt, schedule, dtype):
    features = torch.randn(2, 11, 7, 9).to(dtype)
    masks = (torch.rand(2, 2, 20, 21) < 0.5).float()
    protos, _ = simt.masked_average_pool(features, masks, "mask", 5e-4)
    assert protos.dtype == dtype
    if dtype == torch.float64:
        assert_close(protos, reference.masked_average_pool(features, masks, "mask"), **tol(dtype))
    else:
        assert_close(protos.float(), reference.masked_average_pool(features.float(), masks, "mask"),
                     **rounded_once(dtype))


@pytest.mark.parametrize("mode", ["mask", "features"])
def test_masked_average_pool_backward(simt, schedule, mode):
    features = torch.randn(2, 9, 8, 6, dtype=torch.float64)
    masks = torch.rand(2, 3, 17, 13, dtype=torch.float64)
    protos, area = torch.ops.fsskern.masked_average_pool(features, masks, mode, 1e-3)
    grad, grad_area = torch.randn_like(protos), torch.randn_like(area)
    got_f = simt._masked_average_pool_backward_features(grad, features, masks, area, mode, 1e-3)
    got_m = simt._masked_average_pool_backward_masks(grad, grad_area, features, masks, protos, area, mode, 1e-3)
    want_f = torch.ops.fsskern._masked_average_pool_backward_features(grad, features, masks, area, mode, 1e-3)
    want_m = torch.ops.fsskern._masked_average_pool_backward_masks(grad, grad_area, features, masks, protos, area,
                                                                     mode, 1e-3)
    assert_close(got_f, want_f, **tol(torch.float64))
    assert_close(got_m, want_m, **tol(torch.float64))


# ---- max_cosine: support_norms / max_cosine_forward / max_cosine_backward kernels -------------

# (B, K, C, Nq, Ns, fg): Nq 150 = two full 64-query tiles and a tail; C 40 = two full 16-channel
# steps and a tail; ~100 foreground pixels = a full 64-pixel tile and a tail; fg 0 and 1 are the
# no-foreground and no-background paths.
COS_SHAPES = [(2, 2, 40, 150, 170, 0.6), (1, 3, 16, 64, 64, 1.0), (1, 1, 5, 9, 12, 0.0), (2, 1, 130, 33, 20, 0.5)]


@pytest.mark.parametrize("shape", COS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("signed", [False, True], ids=["relu", "signed"])
def test_max_cosine_forward(simt, schedule, shape, signed):
    B, K, C, Nq, Ns, fg = shape
    q, s = torch.randn(B, C, Nq), torch.randn(B, K, C, Ns)
    if not signed:
        q, s = q.relu(), s.relu()
    w = (torch.rand(B, K, Ns) < fg).float()
    values, idx = simt.max_cosine(q, s, w, 1e-7)
    cpu_values, cpu_idx = torch.ops.fsskern.max_cosine(q, s, w, 1e-7)
    assert_close(values, cpu_values, **FP32)
    assert torch.equal(idx, cpu_idx)


def test_max_cosine_matches_prior_reference_and_float64(simt, schedule):
    q = torch.randn(2, 24, 10, 9, dtype=torch.float64)
    s = torch.randn(2, 2, 24, 8, 8, dtype=torch.float64)
    m = (torch.rand(2, 2, 8, 8) < 0.4).double()
    values, _ = simt.max_cosine(q.flatten(2), s.flatten(3), m.flatten(2), 1e-7)
    want = reference.prior_mask(q, s, m, normalize=False, reduce=None).flatten(2)
    assert_close(values, want, **tol(torch.float64))


def test_max_cosine_nan_poisoning(simt, schedule):
    q, s = torch.rand(1, 6, 20), torch.rand(1, 2, 6, 15)
    w = (torch.rand(1, 2, 15) < 0.5).float()
    w[0, 0, 3] = 0
    s[0, 0, 2, 3] = float("inf")  # masked out: the reference's 0 * inf poisons shot 0
    q[0, 1, 7] = float("nan")
    values, _ = simt.max_cosine(q, s, w, 1e-7)
    cpu_values, _ = torch.ops.fsskern.max_cosine(q, s, w, 1e-7)
    assert_close(values, cpu_values, equal_nan=True)
    assert torch.isnan(values[0, 0]).all() and torch.isnan(values[0, 1, 7])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_max_cosine_reduced_precision(simt, schedule, dtype):
    # read as they are, float32 inside and float32 values: the CPU kernel's values and argmax
    q, s = torch.randn(2, 40, 150).to(dtype), torch.randn(2, 2, 40, 170).to(dtype)
    w = (torch.rand(2, 2, 170) < 0.6).to(dtype)
    values, idx = simt.max_cosine(q, s, w, 1e-7)
    cpu_values, cpu_idx = torch.ops.fsskern.max_cosine(q, s, w, 1e-7)
    assert values.dtype == torch.float32
    assert_close(values, cpu_values, **FP32)
    assert torch.equal(idx, cpu_idx)
    grad = torch.randn(values.shape)
    got = simt._max_cosine_backward(grad, q, s, w, idx, 1e-7)
    want = torch.ops.fsskern._max_cosine_backward(grad, q, s, w, idx, 1e-7)
    for g, r in zip(got, want):
        assert g.dtype == dtype
        assert_close(g.float(), r.float(), rtol=2 ** -7, atol=1e-5)


@pytest.mark.parametrize("C", [7, 300], ids=["C7", "C300"])  # below and above one pass of 128 threads
def test_max_cosine_backward(simt, schedule, C):
    q, s = torch.randn(2, C, 21, dtype=torch.float64), torch.randn(2, 2, C, 17, dtype=torch.float64)
    w = (torch.rand(2, 2, 17) < 0.6).double()
    _, idx = torch.ops.fsskern.max_cosine(q, s, w, 1e-7)
    grad = torch.randn(2, 2, 21, dtype=torch.float64)
    got = simt._max_cosine_backward(grad, q, s, w, idx, 1e-7)
    want = torch.ops.fsskern._max_cosine_backward(grad, q, s, w, idx, 1e-7)
    for g, r in zip(got, want):
        assert_close(g, r, **tol(torch.float64))



def test_backward_launchers_check_their_extra_inputs(simt):
    # the CUDA launchers share the CPU ops' checks: indices past the support would have made the kernel's
    # atomics write past grad_support, a short lse read past it
    q, s, w = torch.randn(1, 4, 3), torch.randn(1, 2, 4, 5), torch.ones(1, 2, 5)
    values, idx = torch.ops.fsskern.max_cosine(q, s, w, 1e-7)
    with pytest.raises(RuntimeError, match=r"indices must lie in \[-1, 5\)"):
        simt._max_cosine_backward(torch.ones_like(values), q, s, w, torch.full_like(idx, 5), 1e-7)
    q, k, v = torch.randn(1, 1, 8, 4), torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4)
    out, lse = torch.ops.fsskern.prototype_attention(q, k, v, None, 1.0, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"_prototype_attention_backward: lse must be Float \[1, 1, 8\]"):
        simt._prototype_attention_backward(torch.ones_like(out), q, k, v, None, out, lse[..., :1], 1.0, 0.0, 0)

# ---- clustering: lsh_hash / kmeans_assign / kmeans_count_bits / kmeans_update / cluster_means ----

@pytest.mark.parametrize("bits,E", [(64, 37), (13, 16), (1, 300)], ids=["64x37", "13x16", "1x300"])
def test_lsh_hash_bit_identical(simt, schedule, bits, E):
    # 700 points: several blocks of 128 threads and a tail; the CPU kernel's blocks of 16 points
    # and 16 planes have tails too
    x = torch.randn(700, E)
    planes = torch.randn(bits, E + 1)
    assert torch.equal(simt.lsh_hash(x, planes), torch.ops.fsskern.lsh_hash(x, planes))
    xd, pd = x.double(), planes.double()
    assert torch.equal(simt.lsh_hash(xd, pd), torch.ops.fsskern.lsh_hash(xd, pd))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lsh_hash_reduced_precision_bit_identical(simt, schedule, dtype):
    x, planes = torch.randn(700, 37).to(dtype), torch.randn(30, 38)  # float32 planes
    got = simt.lsh_hash(x, planes)
    assert torch.equal(got, torch.ops.fsskern.lsh_hash(x, planes))
    assert torch.equal(got, torch.ops.fsskern.lsh_hash(x.float(), planes))


def test_lsh_hash_channel_first_maps_bit_identical(simt, schedule):
    # (maps, pixels, channels) read in place with strides (C * M, 1, M): the CPU kernel's
    # in-place path (whole blocks of 16 pixels) and its copied tail (M = 150)
    maps = torch.randn(3, 40, 150)
    x = maps.transpose(1, 2)
    planes = torch.randn(20, 41)
    got = torch.ops.fsskern.lsh_hash(x, planes)
    assert got.shape == (3, 150)
    assert torch.equal(simt.lsh_hash(x, planes), got)
    assert torch.equal(got, torch.ops.fsskern.lsh_hash(x.contiguous(), planes))


@pytest.mark.parametrize("k,iters", [(12, 10), (1, 3), (40, 0)])
def test_hamming_kmeans_identical(simt, schedule, k, iters):
    # 600 points per row: three blocks of 256 and a tail; row 1 has <= k valid points (raw path)
    codes = torch.randint(-(2**62), 2**62, (3, 600)) ^ torch.randint(0, 2, (3, 600)) << 63
    valid = torch.rand(3, 600) < 0.7
    valid[1] = False
    valid[1, 100:100 + k] = True
    from fsskern import ops
    init = ops.draw_init(valid, k, torch.Generator().manual_seed(4))
    got = simt.hamming_kmeans(codes, valid, init, k, iters)
    want = torch.ops.fsskern.hamming_kmeans(codes, valid, init, k, iters)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cluster_means(simt, schedule, dtype):
    # C = 300: more channels than the block's 256 threads
    features = torch.randn(2, 90, 300).to(dtype)
    assign = torch.randint(-1, 7, (2, 90))
    got = simt.cluster_means(features, assign, 7, 1e-3)
    want = torch.ops.fsskern.cluster_means(features, assign, 7, 1e-3)
    assert_close(got[0], want[0], **(tol(dtype) if dtype != torch.bfloat16 else dict(rtol=0, atol=0)))
    assert torch.equal(got[1], want[1])


def test_cluster_means_channel_first_maps(simt, schedule):
    # (B, S, C, M) maps of S = 3 shots: the CPU kernel's by-channel path, C = 20 leaves a
    # partial group of 16 channels
    maps = torch.randn(2, 3, 20, 30)
    assign = torch.randint(-1, 7, (2, 90))
    got = simt.cluster_means(maps, assign, 7, 1e-3)
    want = torch.ops.fsskern.cluster_means(maps, assign, 7, 1e-3)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- attention: forward, backward-query and backward-key kernels --------------------------------

# (B, H, N, D, Dv, P): D and Dv above one warp's 32 lanes, N not a multiple of the 4 warps per
# block, P = 1, one image with every key invalid.
ATTENTION_SHAPES = [(2, 3, 37, 40, 35, 9), (1, 2, 6, 4, 3, 1)]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prototype_attention(simt, schedule, shape, dtype, dropout_p):
    B, H, N, D, Dv, P = shape
    q, k, v = torch.randn(B, H, N, D, dtype=dtype), torch.randn(B, H, P, D, dtype=dtype), \
        torch.randn(B, H, P, Dv, dtype=dtype)
    valid = torch.rand(B, P) < 0.6
    valid[0, 0] = True
    if B > 1:
        valid[1] = False
    args = (valid, 0.3, dropout_p, 17)
    out, lse = simt.prototype_attention(q, k, v, *args)
    cpu_out, cpu_lse = torch.ops.fsskern.prototype_attention(q, k, v, *args)
    assert_close(out, cpu_out, **tol(dtype))  # the same dropout mask on both
    assert_close(lse, cpu_lse, **tol(dtype))
    if dropout_p == 0:
        assert_close(out, reference.attention.prototype_attention(q, k, v, valid, scale=0.3).masked_fill(
            ~valid.any(1)[:, None, None, None], 0.0), **tol(dtype))
    grad = torch.randn_like(out)
    got = simt._prototype_attention_backward(grad, q, k, v, *args[:1], out, lse, *args[1:])
    want = torch.ops.fsskern._prototype_attention_backward(grad, q, k, v, *args[:1], cpu_out, cpu_lse, *args[1:])
    for g, w in zip(got, want):
        assert_close(g, w, **tol(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_prototype_attention_reduced_precision(simt, schedule, dtype, dropout_p, monkeypatch):
    # bf16/fp16 read as they are, float32 inside: out in the inputs' dtype, lse and the sums in float32. The
    # CPU kernel sums in another order, so the outputs may differ by one rounding of the output dtype. Its
    # peer is the CPU kernel's widened path, which computes as the CUDA kernel does (its bf16 products round
    # the probabilities: tests/test_reduced_precision.py holds them to their own bound).
    monkeypatch.setenv("FSSKERN_BF16_DOT", "0")
    q, k, v = (torch.randn(2, 3, n, d).to(dtype) for n, d in ((37, 40), (9, 40), (9, 35)))
    valid = torch.rand(2, 9) < 0.6
    valid[:, 0] = True
    args = (valid, 0.3, dropout_p, 17)
    out, lse = simt.prototype_attention(q, k, v, *args)
    cpu_out, cpu_lse = torch.ops.fsskern.prototype_attention(q, k, v, *args)
    assert out.dtype == dtype and lse.dtype == torch.float32
    unit = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    assert_close(out.float(), cpu_out.float(), rtol=2 * unit, atol=1e-5)
    assert_close(lse, cpu_lse, **FP32)
    grad = torch.randn(out.shape).to(dtype)
    got = simt._prototype_attention_backward(grad, q, k, v, *args[:1], cpu_out, cpu_lse, *args[1:])
    want = torch.ops.fsskern._prototype_attention_backward(grad, q, k, v, *args[:1], cpu_out, cpu_lse, *args[1:])
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert_close(g.float(), w.float(), rtol=2 * unit, atol=unit * float(w.float().abs().max()))


def test_local_attention_reduced_precision(simt, schedule, monkeypatch):
    monkeypatch.setenv("FSSKERN_BF16_DOT", "0")  # the widened CPU path, as above
    query, support, value = torch.randn(2, 6, 40).bfloat16(), torch.randn(2, 6, 33).bfloat16(), \
        torch.randn(2, 4, 33).bfloat16()
    mask = torch.rand(2, 33) < 0.4
    for mode in ("exclude", "multiply"):
        out, lse = simt.local_conditional_attention(query, support, mask, value, mode)
        cpu_out, cpu_lse = torch.ops.fsskern.local_conditional_attention(query, support, mask, value, mode)
        assert out.dtype == torch.bfloat16
        assert_close(out.float(), cpu_out.float(), rtol=2 ** -7, atol=1e-5)
        grad = torch.randn(out.shape).bfloat16()
        got = simt._local_conditional_attention_backward(grad, query, support, mask, value, cpu_out, cpu_lse, mode)
        want = torch.ops.fsskern._local_conditional_attention_backward(grad, query, support, mask, value, cpu_out,
                                                                        cpu_lse, mode)
        for g, w in zip(got, want):
            assert_close(g.float(), w.float(), rtol=2 ** -7, atol=2 ** -8 * float(w.float().abs().max()))


def test_attention_wide_rows_use_fewer_warps(simt, schedule):
    # 48 KiB of shared memory per block: the forward stages D + Dv = 4,000 fp32 values per warp (16,000 B: 3 warps
    # instead of 4), the query backward 2 D (3 warps), the key backward 2 D + Dv = 6,000 (24,000 B: 2 warps).
    q, k, v = torch.randn(1, 1, 5, 2000), torch.randn(1, 1, 3, 2000), torch.randn(1, 1, 3, 2000)
    out, lse = simt.prototype_attention(q, k, v, None, 0.01, 0.0, 0)
    want, want_lse = torch.ops.fsskern.prototype_attention(q, k, v, None, 0.01, 0.0, 0)
    assert_close(out, want, **FP32)
    grads = simt._prototype_attention_backward(torch.ones_like(out), q, k, v, None, out, lse, 0.01, 0.0, 0)
    want_grads = torch.ops.fsskern._prototype_attention_backward(torch.ones_like(out), q, k, v, None, want,
                                                                  want_lse, 0.01, 0.0, 0)
    for g, w in zip(grads, want_grads):
        assert_close(g, w, **FP32)
    with pytest.raises(RuntimeError, match="does not fit in shared memory; at most 12288"):
        simt.prototype_attention(q.repeat(1, 1, 1, 5), k.repeat(1, 1, 1, 5), v.repeat(1, 1, 1, 5), None, 0.01, 0.0, 0)


def test_grid_limits_are_checked_before_narrowing(simt):
    # Heads ride in grid y, which CUDA caps at 65535: the launcher refuses instead of launching a wrong grid.
    q = torch.randn(1, 65536, 1, 1)
    with pytest.raises(RuntimeError, match=r"grid too large \(1, 65536, 1\)"):
        simt.prototype_attention(q, q, q, None, 1.0, 0.0, 0)
    # An empty grid is skipped whatever its other sizes: no query pixel, 65,536 images in grid z.
    values, indices = simt.max_cosine(torch.randn(65536, 1, 0), torch.randn(65536, 1, 1, 1), torch.ones(65536, 1, 1),
                                      1e-7)
    assert values.shape == indices.shape == (65536, 1, 0)


def test_attention_zero_channels(simt, schedule):
    # D = 0 (and D = Dv = 0): no shared memory per warp to size the blocks by, every score 0, v's gradient kept
    q, k = torch.randn(2, 2, 5, 0), torch.randn(2, 2, 4, 0)
    for v in (torch.randn(2, 2, 4, 3), torch.randn(2, 2, 4, 0)):
        out, lse = simt.prototype_attention(q, k, v, None, 1.0, 0.0, 0)
        cpu_out, cpu_lse = torch.ops.fsskern.prototype_attention(q, k, v, None, 1.0, 0.0, 0)
        assert_close(out, cpu_out, **FP32)
        assert_close(lse, cpu_lse, **FP32)
        grad = torch.randn_like(out)
        got = simt._prototype_attention_backward(grad, q, k, v, None, out, lse, 1.0, 0.0, 0)
        want = torch.ops.fsskern._prototype_attention_backward(grad, q, k, v, None, cpu_out, cpu_lse, 1.0, 0.0, 0)
        for g, w in zip(got, want):
            assert_close(g, w, **FP32)
    query, support, value, mask = torch.randn(2, 0, 6), torch.randn(2, 0, 5), torch.randn(2, 3, 5), torch.rand(2, 5) < 0.5
    for mode in ("exclude", "multiply"):
        out, lse = simt.local_conditional_attention(query, support, mask, value, mode)
        assert_close(out, reference.attention.local_conditional_attention(query, support, mask, value, mode), **FP32)
        grad = torch.randn_like(out)
        got = simt._local_conditional_attention_backward(grad, query, support, mask, value, out, lse, mode)
        want = torch.ops.fsskern._local_conditional_attention_backward(grad, query, support, mask, value, out, lse,
                                                                        mode)
        for g, w in zip(got, want):
            assert_close(g, w, **FP32)


@pytest.mark.parametrize("mode", ["exclude", "multiply"])
def test_local_conditional_attention(simt, schedule, mode):
    query, support, value = torch.randn(3, 36, 23), torch.randn(3, 36, 19), torch.randn(3, 33, 19)
    mask = (torch.rand(3, 19) < 0.4).float()
    mask[1], mask[2] = 0, 1  # no foreground; no background
    out, lse = simt.local_conditional_attention(query, support, mask, value, mode)
    assert_close(out, reference.attention.local_conditional_attention(query, support, mask, value, mode), **FP32)
    cpu_out, cpu_lse = torch.ops.fsskern.local_conditional_attention(query, support, mask, value, mode)
    grad = torch.randn_like(out)
    got = simt._local_conditional_attention_backward(grad, query, support, mask, value, out, lse, mode)
    want = torch.ops.fsskern._local_conditional_attention_backward(grad, query, support, mask, value, cpu_out,
                                                                    cpu_lse, mode)
    for g, w in zip(got, want):
        assert_close(g, w, **FP32)


# ---- the harness catches the classic bugs -------------------------------------------------------

CAUGHT = {
    "neighbour_missing_barrier": "before any thread wrote it|no barrier in between",
    "neighbour_overwrite_race": r"no barrier in between \(race\)",
    "shared_off_by_one": "indexes shared vals at 64, outside its 64 elements",
    "shared_off_by_one_2d": "indexes shared tile at 32, outside its 32 elements",
    "dynamic_shared_overflow": "outside its 32 elements",
    "read_before_write": "before any thread wrote it",
    "barrier_in_branch": "barrier divergence: .* has exited",
    "two_different_barriers": "barrier divergence: .* waits at __syncthreads .*:\\d+, thread",
    "shuffle_wrong_mask": "mask names a lane that does not take part",
}


@pytest.mark.parametrize("kernel", sorted(CAUGHT))
def test_planted_bug_is_caught(simt, schedule, kernel):
    with pytest.raises(RuntimeError, match=f"in kernel {kernel}: simt: .*{CAUGHT[kernel]}"):
        simt._planted(kernel)


def test_correct_twins_pass(simt, schedule):
    ids = torch.arange(64.0)
    assert torch.equal(simt._planted("neighbour_with_barrier"), (ids + 1) % 64)
    assert (simt._planted("block_sum_ok") == 2016).all()
    lanes = ids % 32
    shuffled = torch.where(lanes < 15, ids + 1, ids)
    assert torch.equal(simt._planted("shuffle_partial_mask_ok"), shuffled)
    xor = ids + torch.where(ids % 2 == 0, 1.0, -1.0)
    assert torch.equal(simt._planted("collectives_ok"), 11 * 1000 + xor + 0.5)  # 11 of 32 lanes % 3 == 0


def test_schedules_expose_a_global_memory_race(simt):
    outputs = []
    for name, seed in SCHEDULES:
        simt._simt_set_schedule(name, seed)
        outputs.append(simt._planted("global_overwrite_race"))
    simt._simt_set_schedule("in_order", 0)
    assert not torch.equal(outputs[0], outputs[1])  # in order vs reversed


def test_unknown_schedule_is_refused(simt):
    with pytest.raises(RuntimeError, match="schedule must be"):
        simt._simt_set_schedule("sideways", 0)


# ---- coverage: this file must run every kernel csrc ships ---------------------------------------

def declared_kernels():
    names = set()
    for path in CSRC.rglob("*.cuh"):
        text = path.read_text()
        names.update(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(", text))
    return names


def test_no_raw_shared_or_triple_chevrons_in_kernels():
    """Kernels declare shared memory through common/shared_memory.cuh and launch through
    fsskern::launch, so that this harness sees every access and every launch."""
    for path in list(CSRC.rglob("*.cu")) + list(CSRC.rglob("*.cuh")):
        if path.name in {"shared_memory.cuh", "launch.cuh"}:
            continue
        text = path.read_text()
        assert "__shared__" not in text, f"{path}: declare shared memory with FSSKERN_SHARED_ARRAY*"
        assert "<<<" not in text, f"{path}: launch kernels with fsskern::launch"


def test_every_cuda_kernel_ran_under_the_emulator(simt):
    """Runs last in this file: every __global__ kernel in csrc/ must have been launched above."""
    declared = declared_kernels()
    assert len(declared) >= 5
    missing = declared - set(simt._simt_launched_kernels())
    assert not missing, f"CUDA kernels with no emulated test: {sorted(missing)}"
