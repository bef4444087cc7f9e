"""lsh_hash, hamming_kmeans, cluster_means and support_prototypes (UMTFSS)."""
import pytest
import torch
from torch.testing import assert_close

from conftest import FP32, rounded_once, tol
from fsskern import ops
from fsskern.reference import clustering as ref
from fsskern.reference import composed


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- lsh_hash -----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [1, 7, 32, 61, 64])
@pytest.mark.parametrize("E", [1, 16, 37, 256])
def test_lsh_hash_float64_equals_reference(bits, E):
    x = torch.randn(500, E, dtype=torch.float64, generator=gen(0))
    planes = ops.lsh_planes(bits, E, generator=gen(1), dtype=torch.float64)
    assert torch.equal(ops.lsh_hash(x, planes), ref.lsh_hash(x, planes))


def test_lsh_hash_float32_agrees_with_exact_projections():
    # fsskern sums in a fixed order; the fp64 reference is exact to far below fp32 rounding, so a
    # disagreement would need a point within ~1e-6 of a hyperplane
    x = torch.randn(4000, 256, generator=gen(0))
    planes = ops.lsh_planes(32, 256, generator=gen(1))
    codes = ops.lsh_hash(x, planes)
    assert (codes != ref.lsh_hash(x.double(), planes.double())).sum() <= 1
    assert (codes != ref.lsh_hash(x, planes)).float().mean() < 1e-3  # the repo's fp32 matmul


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lsh_hash_reads_any_layout_in_place(dtype):
    # FSS support features (B, K, C, h, w) hashed as tokens without the permute copy: the same
    # codes as the contiguous tokens, bit for bit (one order of operations for every layout)
    feats = torch.randn(2, 3, 24, 5, 7, dtype=dtype, generator=gen(0))
    planes = ops.lsh_planes(40, 24, generator=gen(1), dtype=dtype)
    tokens = feats.permute(0, 1, 3, 4, 2)
    want = ops.lsh_hash(tokens.contiguous(), planes)
    assert want.shape == (2, 3, 5, 7)
    assert torch.equal(ops.lsh_hash(tokens, planes), want)
    assert torch.equal(ops.lsh_hash(feats.flatten(3).transpose(2, 3), planes), want.flatten(2))
    rows = tokens.reshape(-1, 24)
    assert torch.equal(ops.lsh_hash(rows[::2], planes), want.flatten()[::2])  # row stride 48
    assert torch.equal(ops.lsh_hash(rows[5], planes), want.flatten()[5])  # one point
    if dtype == torch.float64:
        assert torch.equal(want, ref.lsh_hash(tokens, planes))


def test_lsh_hash_bits_and_sign_bit():
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    planes = torch.zeros(64, 3)
    planes[:, 0] = 1.0  # every bit is x0 > 0
    codes = ops.lsh_hash(x, planes)
    assert codes[0] == -1 and codes[1] == 0  # all 64 bits set: the int64 is -1
    planes[5, 2] = 2.0  # threshold 2: bit 5 never set
    assert ops.lsh_hash(x, planes)[0] == -1 ^ (1 << 5)


def test_lsh_hash_shapes_and_errors():
    x = torch.randn(2, 3, 8)
    assert ops.lsh_hash(x, ops.lsh_planes(16, 8)).shape == (2, 3)
    assert ops.lsh_hash(torch.randn(0, 8), ops.lsh_planes(4, 8)).shape == (0,)
    with pytest.raises(RuntimeError, match=r"planes must be \(bits, E \+ 1\)"):
        ops.lsh_hash(x, torch.randn(16, 8))
    with pytest.raises(RuntimeError, match=r"x must be 2-d \(N, E\) or 3-d \(M, N, E\)"):
        torch.ops.fsskern.lsh_hash(torch.randn(2, 2, 3, 8), ops.lsh_planes(4, 8))
    assert ops.lsh_hash(torch.randn(3, 0, 2, 8), ops.lsh_planes(4, 8)).shape == (3, 0, 2)
    with pytest.raises(RuntimeError, match="1 <= bits <= 64"):
        ops.lsh_hash(x, torch.randn(65, 9))
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        ops.lsh_hash(x.int(), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="planes must be Float for x of dtype Float, got Double"):
        ops.lsh_hash(x, torch.randn(4, 9, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="planes must be Float for x of dtype BFloat16"):
        ops.lsh_hash(x.bfloat16(), torch.randn(4, 9).bfloat16())
    with pytest.raises(ValueError, match="1 <= bits <= 64"):
        ops.lsh_planes(0, 8)


def test_lsh_hash_deterministic_across_threads():
    x = torch.randn(3000, 64, generator=gen(0))
    planes = ops.lsh_planes(32, 64, generator=gen(1))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.lsh_hash(x, planes)
        torch.set_num_threads(2)
        two = ops.lsh_hash(x, planes)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(one, two)


# ---- hamming_kmeans -----------------------------------------------------------------------------

def clustered_codes(B, N, bits, seed):
    x = torch.randn(B * N, 24, generator=gen(seed))
    return ops.lsh_hash(x, ops.lsh_planes(bits, 24, generator=gen(seed + 1))).view(B, N)


@pytest.mark.parametrize("bits", [1, 8, 32, 64])
@pytest.mark.parametrize("k,iters", [(1, 3), (5, 10), (20, 0), (50, 10)])
def test_kmeans_equals_reference(bits, k, iters):
    codes = clustered_codes(3, 400, bits, seed=bits + k)
    valid = torch.rand(3, 400, generator=gen(k)) < 0.7
    valid[2] = False
    valid[2, :k] = True  # exactly k valid points: each its own cluster
    init = ops.draw_init(valid, k, gen(5))
    got = ops.hamming_kmeans(codes, k, iters=iters, valid=valid, init=init)
    want = ref.hamming_kmeans(codes, k, iters, valid, init)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    assign, _, counts = got
    assert (assign[~valid] == -1).all()
    assert torch.equal(counts.sum(1), valid.sum(1))


def test_kmeans_without_vector_popcount_equals_reference():
    # FSSKERN_VPOPCNT=0 runs the bit-parallel popcount that CPUs without VPOPCNTDQ use
    script = """
import torch
from fsskern import ops
from fsskern.reference import clustering as ref
g = torch.Generator().manual_seed(0)
for bits in (32, 64):
    codes = ops.lsh_hash(torch.randn(2 * 500, 24, generator=g), ops.lsh_planes(bits, 24, generator=g)).view(2, 500)
    valid = torch.rand(2, 500, generator=g) < 0.7
    init = ops.draw_init(valid, 12, g)
    got = ops.hamming_kmeans(codes, 12, iters=6, valid=valid, init=init)
    want = ref.hamming_kmeans(codes, 12, 6, valid, init)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
print("ok")
"""
    import os, subprocess, sys
    out = subprocess.run([sys.executable, "-c", script], env={**os.environ, "FSSKERN_VPOPCNT": "0"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_kmeans_fewer_points_than_clusters():
    codes = torch.tensor([[5, 9, 9, 3]])
    valid = torch.tensor([[True, False, True, True]])
    assign, centroids, counts = ops.hamming_kmeans(codes, 6, valid=valid, generator=gen(0))
    assert assign.tolist() == [[0, -1, 1, 2]]
    assert centroids.tolist() == [[5, 9, 3, 0, 0, 0]]
    assert counts.tolist() == [[1, 1, 1, 0, 0, 0]]


def test_kmeans_ties_duplicates_and_empty_clusters():
    # duplicates: two identical start points, so one cluster stays empty and keeps its code
    codes = torch.tensor([[0b0011, 0b0011, 0b0011, 0b1100, 0b1100]])
    init = torch.tensor([[0, 1, 3]])
    assign, centroids, counts = ops.hamming_kmeans(codes, 3, init=init, iters=5)
    assert assign.tolist() == [[0, 0, 0, 2, 2]]  # lowest index wins the tie between 0 and 1
    assert counts.tolist() == [[3, 0, 2]] and centroids.tolist() == [[0b0011, 0b0011, 0b1100]]
    # a tie in the majority vote keeps the previous bit
    codes = torch.tensor([[0b01, 0b10, 0b11, 0b00]])
    init = torch.tensor([[2, 3]])  # centroids 11 and 00; 01 and 10 are 1 away from both -> cluster 0
    _, centroids, _ = ops.hamming_kmeans(codes, 2, init=init, iters=1)
    assert centroids[0, 0] == 0b11  # members 01, 10, 11: each bit 2 of 3 set -> 1


def test_kmeans_sign_bit_codes():
    codes = torch.tensor([[-1, -1, 0, -(1 << 63), -2]])  # -(1 << 63): only the sign bit
    got = ops.hamming_kmeans(codes, 2, init=torch.tensor([[0, 2]]), iters=3)
    want = ref.hamming_kmeans(codes, 2, 3, torch.ones_like(codes, dtype=torch.bool), torch.tensor([[0, 2]]))
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_kmeans_seeded_and_deterministic():
    codes = clustered_codes(2, 2000, 32, seed=3)
    a = ops.hamming_kmeans(codes, 20, generator=gen(7))
    b = ops.hamming_kmeans(codes, 20, generator=gen(7))
    c = ops.hamming_kmeans(codes, 20, generator=gen(8))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[1], c[1])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        d = ops.hamming_kmeans(codes, 20, generator=gen(7))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(x, y) for x, y in zip(a, d))


def test_kmeans_all_invalid_and_empty():
    codes = clustered_codes(2, 50, 16, seed=0)
    assign, centroids, counts = ops.hamming_kmeans(codes, 4, valid=torch.zeros(2, 50, dtype=torch.bool))
    assert (assign == -1).all() and (counts == 0).all() and (centroids == 0).all()
    assign, _, counts = ops.hamming_kmeans(torch.zeros(2, 0, dtype=torch.long), 4)
    assert assign.shape == (2, 0) and (counts == 0).all()


def test_kmeans_init_of_a_row_with_few_points_is_not_read():
    """init is checked, and read, only for rows with more than k valid points: another row's init may name
    anything (the gather had failed on it: an error on the CPU, a device-side assert on CUDA)."""
    codes = clustered_codes(2, 10, 16, seed=0)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 2:] = False  # row 1: 2 valid points for k = 3
    for bad in ([-1, -1, -1], [7, 8, 9], [40, 50, 60]):
        init = torch.tensor([[0, 1, 2], bad])
        assign, centroids, counts = ops.hamming_kmeans(codes, 3, valid=valid, init=init, iters=2)
        assert assign[1, :2].tolist() == [0, 1] and counts[1].tolist() == [1, 1, 0]


def test_support_prototypes_of_an_empty_batch():
    args = (torch.randn(0, 1, 8, 5, 5), torch.rand(0, 1, 5, 5) > 0.5)
    out, valid = ops.support_prototypes(*args, k_fg=3, k_bg=4)
    ref_out, ref_valid = composed.support_prototypes(*args, k_fg=3, k_bg=4)
    assert out.shape == ref_out.shape == (0, 7, 8) and valid.shape == ref_valid.shape == (0, 7)


def test_kmeans_bad_inputs():
    codes = clustered_codes(1, 30, 16, seed=0)
    with pytest.raises(RuntimeError, match="codes must be an int64"):
        ops.hamming_kmeans(codes.int(), 3)
    with pytest.raises(RuntimeError, match="k must be >= 1"):
        torch.ops.fsskern.hamming_kmeans(codes, torch.ones_like(codes, dtype=torch.bool),
                                         torch.zeros(1, 0, dtype=torch.long), 0, 2)
    for k in (0, -1):  # used to reach topk ("selected index k out of range")
        with pytest.raises(ValueError, match="hamming_kmeans: k must be >= 1"):
            ops.hamming_kmeans(codes, k)
        with pytest.raises(ValueError, match="draw_init: k must be >= 1"):
            ops.draw_init(torch.ones(1, 30, dtype=torch.bool), k)
        with pytest.raises(ValueError, match="support_prototypes: k_fg and k_bg must be >= 1"):
            ops.support_prototypes(torch.randn(1, 1, 4, 3, 3), torch.ones(1, 1, 3, 3), k_bg=k)
    with pytest.raises(RuntimeError, match="iters must be >= 0"):
        ops.hamming_kmeans(codes, 3, iters=-1)
    with pytest.raises(RuntimeError, match="init must be int64"):
        ops.hamming_kmeans(codes, 3, init=torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(RuntimeError, match="distinct valid points"):
        ops.hamming_kmeans(codes, 3, init=torch.tensor([[1, 1, 2]]))
    with pytest.raises(RuntimeError, match=r"init indices must lie in \[0, 30\)"):
        ops.hamming_kmeans(codes, 3, init=torch.tensor([[1, 2, 30]]))
    valid = torch.ones(1, 30, dtype=torch.bool)
    valid[0, 4] = False
    with pytest.raises(RuntimeError, match="distinct valid points"):
        ops.hamming_kmeans(codes, 3, valid=valid, init=torch.tensor([[1, 4, 2]]))
    with pytest.raises(ValueError, match="valid must be a bool"):
        ops.hamming_kmeans(codes, 3, valid=valid.int())
    with pytest.raises(RuntimeError, match="valid must be a bool"):
        torch.ops.fsskern.hamming_kmeans(codes, valid.int(), torch.tensor([[1, 2, 3]]), 3, 2)


# ---- cluster_means ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cluster_means_equal_umtfss(dtype):
    features = torch.randn(2, 300, 70, dtype=dtype, generator=gen(0))
    assign = torch.randint(-1, 9, (2, 300), generator=gen(1))
    assign[1][assign[1] == 4] = 5  # cluster 4 empty in image 1
    means, counts = ops.cluster_means(features, assign, 9)
    want, want_counts = ref.cluster_means(features, assign, 9)
    assert_close(means, want, **tol(dtype))
    assert torch.equal(counts, want_counts) and counts[1, 4] == 0 and (means[1, 4] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cluster_means_of_channel_first_maps(dtype):
    # (B, S, C, h, w) support maps: points numbered shot by shot, pixel by pixel, read in place;
    # the same sums in the same order as the (B, N, C) tokens, so equal bit for bit
    maps = torch.randn(2, 3, 37, 4, 5, generator=gen(0)).to(dtype)
    assign = torch.randint(-1, 6, (2, 60), generator=gen(1))
    tokens = maps.permute(0, 1, 3, 4, 2).reshape(2, 60, 37)
    means, counts = ops.cluster_means(maps, assign, 6)
    want, want_counts = ops.cluster_means(tokens, assign, 6)
    assert torch.equal(means, want) and torch.equal(counts, want_counts)
    assert torch.equal(ops.cluster_means(tokens.transpose(1, 2).contiguous().transpose(1, 2), assign, 6)[0], want)
    if dtype == torch.float64:
        assert_close(means, ref.cluster_means(tokens, assign, 6)[0], **tol(dtype))


def test_cluster_means_of_maps_gradcheck_and_opcheck():
    maps = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    assign = torch.randint(-1, 4, (2, 24), generator=gen(2))
    assert torch.autograd.gradcheck(lambda f: ops.cluster_means(f, assign, 4)[0], (maps,))
    torch.library.opcheck(torch.ops.fsskern.cluster_means.default, (maps, assign, 4, 1e-3))
    torch.library.opcheck(torch.ops.fsskern.lsh_hash.default, (maps.detach().float()[0].transpose(1, 2),
                                                                torch.randn(8, 6)))


def test_cluster_means_reduced_precision_and_zero_eps():
    features = torch.randn(1, 64, 16, generator=gen(0))
    assign = torch.randint(0, 4, (1, 64), generator=gen(1))
    for dtype in (torch.float16, torch.bfloat16):
        means, _ = ops.cluster_means(features.to(dtype), assign, 6, eps=0.0)
        assert means.dtype == dtype
        want, _ = ref.cluster_means(features.to(dtype).float(), assign, 6, eps=0.0)
        want = torch.nan_to_num(want)  # empty clusters: 0 / 0 in the reference, 0 here
        assert_close(means.float(), want, **rounded_once(dtype))


def test_cluster_means_gradcheck_and_opcheck():
    features = torch.randn(2, 30, 5, dtype=torch.float64, requires_grad=True)
    assign = torch.randint(-1, 4, (2, 30), generator=gen(2))
    assert torch.autograd.gradcheck(lambda f: ops.cluster_means(f, assign, 4)[0], (features,))
    torch.library.opcheck(torch.ops.fsskern.cluster_means.default, (features, assign, 4, 1e-3))
    torch.library.opcheck(torch.ops.fsskern.cluster_means.default, (features.detach().float(), assign, 4, 0.0))
    torch.library.opcheck(torch.ops.fsskern.lsh_hash.default, (torch.randn(20, 6), torch.randn(8, 7)))
    codes = clustered_codes(2, 40, 16, seed=1)
    valid = torch.rand(2, 40, generator=gen(3)) < 0.5
    torch.library.opcheck(torch.ops.fsskern.hamming_kmeans.default,
                          (codes, valid, ops.draw_init(valid, 5, gen(4)), 5, 4))
    codes_t, valid_t = codes.t().contiguous().t(), valid.t().contiguous().t()  # column-major views
    torch.library.opcheck(torch.ops.fsskern.hamming_kmeans.default,
                          (codes_t, valid_t, ops.draw_init(valid, 5, gen(4)), 5, 4))


def test_cluster_means_non_finite_stays_in_its_cluster():
    """A NaN token poisons its own cluster's channel only, and an unassigned one nothing. The reference's
    ``one_hot^T @ feats`` spreads it to that channel of every cluster (0 * NaN); the README lists this exception."""
    features, assign = torch.randn(1, 8, 3), torch.tensor([[0, 0, 1, 1, 2, 2, -1, -1]])
    bad = features.clone()
    bad[0, 2, 1], bad[0, 6, 0] = float("nan"), float("inf")
    means, counts = ops.cluster_means(bad, assign, 3)
    clean, _ = ops.cluster_means(features, assign, 3)
    assert means.isnan().nonzero().tolist() == [[0, 1, 1]]
    finite = ~means.isnan()
    assert torch.equal(means[finite], clean[finite]) and counts.tolist() == [[2, 2, 2]]
    assert ref.cluster_means(bad, assign, 3)[0][0, :, 1].isnan().all()  # the documented difference


def test_cluster_means_bad_inputs():
    f = torch.randn(1, 10, 4)
    with pytest.raises(RuntimeError, match=r"assign must lie in \[-1, 3\)"):
        ops.cluster_means(f, torch.full((1, 10), 3), 3)
    with pytest.raises(RuntimeError, match="assign must be int64"):
        ops.cluster_means(f, torch.zeros(1, 9, dtype=torch.long), 3)
    with pytest.raises(RuntimeError, match=r"features must be 3-d \(B, N, C\) or 4-d channel-first maps"):
        ops.cluster_means(f[0], torch.zeros(1, 10, dtype=torch.long), 3)
    with pytest.raises(RuntimeError, match=r"assign must be int64 \(B, N\) = \(1, 12\)"):
        ops.cluster_means(torch.randn(1, 2, 4, 6), torch.zeros(1, 10, dtype=torch.long), 3)
    with pytest.raises(RuntimeError, match="eps must be finite"):
        ops.cluster_means(f, torch.zeros(1, 10, dtype=torch.long), 3, eps=-1.0)


def test_lsh_hash_of_many_dims_with_zero_points():
    # (..., 0, E): reshape(-1, 0, E) used to fail ("the unspecified dimension size -1 can be any value")
    assert ops.lsh_hash(torch.randn(2, 3, 0, 4), ops.lsh_planes(8, 4)).shape == (2, 3, 0)
    assert ops.lsh_hash(torch.randn(2, 0, 5, 4), ops.lsh_planes(8, 4)).shape == (2, 0, 5)


def test_fakes_check_devices_like_the_kernels():
    # A meta tensor beside a CPU one dispatches to the fake: it used to return a CPU tensor (lsh_hash) or pass.
    meta = torch.device("meta")
    with pytest.raises(RuntimeError, match="lsh_hash: x and planes must be on one device"):
        torch.ops.fsskern.lsh_hash(torch.randn(5, 8), torch.randn(4, 9, device=meta))
    codes = clustered_codes(1, 30, 16, seed=0)
    with pytest.raises(RuntimeError, match="hamming_kmeans: codes, valid and init must be on one device"):
        torch.ops.fsskern.hamming_kmeans(codes, torch.ones(1, 30, dtype=torch.bool, device=meta),
                                         torch.tensor([[1, 2, 3]]), 3, 2)
    with pytest.raises(RuntimeError, match="cluster_means: features and assign must be on one device"):
        torch.ops.fsskern.cluster_means(torch.randn(1, 10, 4), torch.zeros(1, 10, dtype=torch.long, device=meta),
                                        3, 1e-3)
    # all-meta inputs still give meta outputs of the kernels' shapes (torch.compile's tracing)
    assert torch.ops.fsskern.lsh_hash(torch.randn(5, 8, device=meta), torch.randn(4, 9, device=meta)).device == meta


# ---- support_prototypes -------------------------------------------------------------------------

@pytest.mark.parametrize("fg", ["sparse", "none", "all", "tiny"])
def test_support_prototypes_match_the_umtfss_composition(fg):
    B, K, C, h, w = 2, 3, 16, 9, 11
    features = torch.randn(B, K, C, h, w, generator=gen(0))
    masks = (torch.rand(B, K, 36, 44, generator=gen(1)) < 0.3).float()
    if fg == "none":
        masks[0] = 0
    elif fg == "all":
        masks[1] = 1
    elif fg == "tiny":  # fewer foreground tokens than clusters: the tokens are the prototypes
        masks[:] = 0
        masks[:, 0, 8:12, 8:12] = 1
    got, valid = ops.support_prototypes(features, masks, k_fg=5, k_bg=12, bits=32, iters=4, generator=gen(9))
    # the same composition from the reference pieces and the same random draws
    want, want_valid = composed.support_prototypes(features, masks, k_fg=5, k_bg=12, bits=32, iters=4,
                                                   generator=gen(9))
    assert got.shape == (B, 17, C)
    assert torch.equal(valid, want_valid)
    assert_close(got, want, **FP32)
    assert (got[~valid] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_support_prototypes_of_half_features_match_the_reference(dtype):
    """UMTFSS under AMP: the reference drew its planes in the features' dtype (and resized the masks so), which
    hashed ~2 % of bf16 tokens into other clusters (prototypes 0.2 apart); both draw float32 planes now."""
    features = torch.randn(2, 1, 64, 12, 12, generator=gen(0)).to(dtype)
    masks = (torch.rand(2, 1, 48, 48, generator=gen(1)) > 0.5).float()
    got, valid = ops.support_prototypes(features, masks, k_fg=5, k_bg=5, generator=gen(9))
    want, want_valid = composed.support_prototypes(features, masks, k_fg=5, k_bg=5, generator=gen(9))
    assert torch.equal(valid, want_valid)
    assert_close(got.float(), want.float(), rtol=0, atol=float(torch.finfo(dtype).eps) * 2)


def test_reference_cluster_means_counts_exactly_in_bf16():
    """bf16 counts round above 256 (299 -> 300): the reference counts in int64 as the kernel does."""
    features = torch.randn(1, 400, 8, generator=gen(0)).bfloat16()
    assign = torch.zeros(1, 400, dtype=torch.long)
    assign[0, 299:] = 1
    (means, counts), (want_means, want_counts) = ref.cluster_means(features, assign, 2), ops.cluster_means(
        features, assign, 2)
    assert counts.tolist() == want_counts.tolist() == [[299, 101]]
    assert_close(means.float(), want_means.float(), rtol=0, atol=float(torch.finfo(torch.bfloat16).eps))


def test_support_prototypes_gradients_reach_features():
    features = torch.randn(1, 2, 8, 6, 6, generator=gen(0), requires_grad=True)
    masks = (torch.rand(1, 2, 6, 6, generator=gen(1)) < 0.4).float()
    protos, valid = ops.support_prototypes(features, masks, k_fg=3, k_bg=4, generator=gen(2))
    (protos * torch.randn_like(protos)).sum().backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


def _padded(B=2, K=2, H=36, W=44, seed=3):
    """UMTFSS-style padding: each shot's content fills the top-left, the rest is padding (invalid)."""
    valid = torch.zeros(B, K, H, W, dtype=torch.bool)
    g = gen(seed)
    for b in range(B):
        for k in range(K):
            valid[b, k, :int(torch.randint(H // 2, H + 1, (1,), generator=g)),
                  :int(torch.randint(W // 2, W + 1, (1,), generator=g))] = True
    return valid


@pytest.mark.parametrize("fg", ["sparse", "none", "all", "tiny", "all_padded_shot"])
def test_support_prototypes_valid_mask_matches_reference(fg):
    B, K, C, h, w = 2, 2, 16, 9, 11
    features = torch.randn(B, K, C, h, w, generator=gen(0))
    masks = (torch.rand(B, K, 36, 44, generator=gen(1)) < 0.3).float()
    valid = _padded()
    if fg == "none":
        masks[0] = 0
    elif fg == "all":  # the 4-corner background fallback, then the padded corners dropped
        masks[1] = 1
    elif fg == "tiny":
        masks[:] = 0
        masks[:, 0, 8:12, 8:12] = 1
    elif fg == "all_padded_shot":
        valid[0, 1] = False
    args = dict(valid=valid, k_fg=5, k_bg=12, bits=32, iters=4)
    got, got_valid = ops.support_prototypes(features, masks, generator=gen(9), **args)
    want, want_valid = composed.support_prototypes(features, masks, generator=gen(9), **args)
    assert torch.equal(got_valid, want_valid)
    assert_close(got, want, **FP32)
    if fg == "all":  # the raw valid corner tokens are the background prototypes
        keep = torch.nn.functional.interpolate(valid.float(), size=(h, w), mode="nearest").bool()
        assert int(got_valid[1, 5:].sum()) == int(keep[1][:, [0, 0, -1, -1], [0, -1, 0, -1]].sum()) < 8


def test_support_prototypes_masked_tokens_never_influence_prototypes():
    """Invalid tokens (at feature resolution after the nearest resize) may hold anything: the prototypes,
    their validity and the gradients of the valid tokens do not change, and invalid tokens get no gradient."""
    B, K, C, h, w = 2, 2, 16, 9, 11
    valid = _padded()
    keep = torch.nn.functional.interpolate(valid.float(), size=(h, w), mode="nearest").bool()[:, :, None]
    masks = (torch.rand(B, K, 36, 44, generator=gen(1)) < 0.3).float()
    base = torch.randn(B, K, C, h, w, generator=gen(0))
    runs = []
    for noise_seed in (4, 5):
        noise = 100 * torch.randn(B, K, C, h, w, generator=gen(noise_seed))
        features = torch.where(keep, base, noise).requires_grad_()
        for backend in (ops, composed):
            protos, pvalid = backend.support_prototypes(features, masks, valid=valid, k_fg=4, k_bg=9, iters=4,
                                                        generator=gen(7))
            grad, = torch.autograd.grad((protos * torch.randn(protos.shape, generator=gen(8))).sum(), features)
            assert (grad.masked_select(~keep.expand_as(grad)) == 0).all()
            runs.append((protos, pvalid, grad))
    (p, v, g), rest = runs[0], runs[1:]
    for q, u, f in rest:
        assert torch.equal(u, v)
        assert_close(q, p, **FP32)
        assert_close(f, g, **FP32)
    # and an all-valid mask is the same as no mask
    full = torch.ones_like(valid)
    assert torch.equal(ops.support_prototypes(base, masks, valid=full, generator=gen(7))[0],
                       ops.support_prototypes(base, masks, generator=gen(7))[0])


def test_support_prototypes_valid_mask_errors():
    features, masks = torch.randn(1, 2, 8, 6, 6), torch.zeros(1, 2, 12, 12)
    with pytest.raises(ValueError, match="valid must be a bool"):
        ops.support_prototypes(features, masks, valid=torch.ones(1, 2, 12, 12))
    with pytest.raises(ValueError, match="valid must be a bool"):
        ops.support_prototypes(features, masks, valid=torch.ones(1, 3, 12, 12, dtype=torch.bool))


@pytest.mark.parametrize("case", ["no foreground", "no background"])
def test_support_prototypes_fallback_tokens(case):
    """UMTFSS's fallbacks checked against the feature maps themselves (the reference shares the token selection
    with the op): no foreground -> the centre 2x2 tokens of every shot, no background -> the 4 corners. With
    as many clusters as fallback tokens, each token is its own prototype."""
    B, K, C, h, w = 1, 2, 6, 6, 7
    features = torch.randn(B, K, C, h, w, dtype=torch.float64)
    fill = 0.0 if case == "no foreground" else 1.0
    masks = torch.full((B, K, 11, 13), fill)
    out, valid = ops.support_prototypes(features, masks, k_fg=4 * K, k_bg=4 * K, generator=gen(0))
    if case == "no foreground":
        tokens, got = features[0, :, :, h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1], out[0, :4 * K]
    else:
        tokens, got = features[0][:, :, [0, 0, -1, -1], [0, -1, 0, -1]], out[0, 4 * K:]
    want = torch.nn.functional.normalize(tokens.flatten(2).transpose(1, 2).reshape(-1, C), dim=1)
    order = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731  (the clusters' order is the op's business)
    assert_close(order(got), order(want))


@pytest.mark.parametrize("case", ["no foreground", "no background"])
def test_support_prototypes_fallback_is_per_shot(case):
    """One shot without foreground (or background) beside one with both: as the code's
    ``get_supp_flatten_input``, that shot alone gives its centre 2x2 (corner) tokens, and the other shot's
    tokens stay as they are. Masks at the feature size, so the token sets are the masks themselves."""
    B, K, C, h, w = 1, 2, 6, 6, 7
    features = torch.randn(B, K, C, h, w, dtype=torch.float64)
    masks = torch.zeros(B, K, h, w, dtype=torch.float64)
    masks[0, 0, 1:3, 1:4] = 1  # shot 0: 6 foreground tokens, 36 background
    masks[0, 1] = 0.0 if case == "no foreground" else 1.0
    out, valid = ops.support_prototypes(features, masks, k_fg=64, k_bg=64, generator=gen(0))
    f = features[0].permute(0, 2, 3, 1)  # (K, h, w, C)
    if case == "no foreground":
        want = torch.cat([f[0][masks[0, 0] == 1], f[1, h // 2 - 1:h // 2 + 1, w // 2 - 1:w // 2 + 1].reshape(-1, C)])
        got = out[0, :64][valid[0, :64]]
    else:
        want = torch.cat([f[0][masks[0, 0] == 0], f[1][[0, 0, -1, -1], [0, -1, 0, -1]]])
        got = out[0, 64:][valid[0, 64:]]
    want = torch.nn.functional.normalize(want, dim=1)
    order = lambda t: t[torch.argsort(t[:, 0])]  # noqa: E731
    assert got.shape == want.shape
    assert_close(order(got), order(want))
