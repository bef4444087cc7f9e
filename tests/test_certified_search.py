"""The certified bf16 search of max_cosine / prior_mask: the fp32 kernel's max and argmax, on random data, on
adversarial near-ties below bf16's resolution, with the fp32 fallback where bf16 hardware is absent; with both of
the CPU kernel's bf16 GEMMs."""
import pytest
import torch
from torch.testing import assert_close

from conftest import FP32
from fsskern import build_info, ops
from fsskern.reference import composed
from fsskern.ops.certified_search import bf16_hardware, bf16_search, certified_max_cosine, error_bound

BF16 = torch.bfloat16
OWN_GEMM = bf16_hardware(torch.device("cpu")) == "AVX512-BF16"


@pytest.fixture(params=["fsskern", "onednn"], autouse=True)
def gemm(request, monkeypatch):
    """The CPU kernel's bf16 products: fsskern's vdpbf16ps GEMM (float32 scores) on AVX512-BF16 without AMX,
    oneDNN's (bf16 scores, one more rounding in the bound) elsewhere and under FSSKERN_BF16_DOT=0. Every test
    runs on both where the CPU has both."""
    if request.param == "fsskern" and not OWN_GEMM:
        pytest.skip("fsskern's bf16 GEMM runs on AVX512-BF16 CPUs without AMX-BF16 only")
    if request.param == "onednn":
        monkeypatch.setenv("FSSKERN_BF16_DOT", "0")
    return request.param


def inputs(B, K, C, Ns, Nq, fg=0.5, soft=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s = torch.randn(B, C, Nq, generator=g), torch.randn(B, K, C, Ns, generator=g)
    w = torch.rand(B, K, Ns, generator=g)
    w = torch.where(w < fg, w if soft else torch.ones_like(w), torch.zeros_like(w))
    return q, s, w


def fp32_and_certified(q, s, w, eps=1e-7):
    with bf16_search("always"):
        return ops.max_cosine(q, s, w, eps=eps), ops.max_cosine(q, s, w, eps=eps, search_dtype=BF16)


@pytest.mark.parametrize("shape,fg,soft", [((2, 1, 64, 50, 70), 0.5, False), ((1, 3, 256, 400, 300), 0.3, True),
                                           ((2, 2, 33, 17, 9), 1.0, False), ((1, 2, 8, 5, 6), 0.0, False),
                                           ((1, 2, 37, 150, 40), 0.5, True),  # odd C: the last pair half empty
                                           ((1, 1, 2048, 120, 90), 0.5, False),
                                           ((1, 2, 64, 5000, 600), 0.5, False)], ids=str)  # CPU: 2 tiles, 3 chunks
def test_equals_the_fp32_kernel_on_random_data(shape, fg, soft):
    q, s, w = inputs(*shape, fg=fg, soft=soft)
    (values, indices), (got, got_idx) = fp32_and_certified(q, s, w)
    assert torch.equal(got_idx, indices)
    assert_close(got, values, **FP32)
    composite, composite_idx = certified_max_cosine(q, s, w, 1e-7)  # what runs on GPUs
    assert torch.equal(composite_idx, indices)
    assert_close(composite, values, **FP32)


def test_cpu_kernel_repeats_exactly_across_thread_counts():
    q, s, w = inputs(2, 2, 96, 2600, 300, fg=0.9)
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(torch.ops.fsskern.max_cosine_bf16_search(q, s, w, 1e-7))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_cpu_kernel_falls_back_where_its_bound_does_not_hold():
    # each case must give the fp32 kernel's answer, NaN rules included: eps = 0 (or 0 once a float), a non-finite
    # masked-out support pixel (poisons its shot), a non-finite foreground pixel, a non-finite query in a shot with
    # no foreground (no tile ever reads that query), and float16 inputs
    q, s, w = inputs(2, 2, 24, 40, 30, fg=0.5)
    w[1, 1] = 0
    cases = [(q, s, w, 0.0), (q, s, w, 1e-60)]  # 1e-60: a double eps that is 0 as a float
    for where in ((0, 0, 3, int((w[0, 0] == 0).nonzero()[0])), (0, 1, 5, int((w[0, 1] != 0).nonzero()[0]))):
        bad = s.clone()
        bad[where] = float("inf")
        cases.append((q, bad, w, 1e-7))
    q_bad = q.clone()
    q_bad[1, 2, 7] = float("nan")
    cases += [(q_bad, s, w, 1e-7), (q.half(), s.half(), w.half(), 1e-7)]
    for args in cases:
        want = torch.ops.fsskern.max_cosine(*args)
        got = torch.ops.fsskern.max_cosine_bf16_search(*args)
        assert got[0].dtype == want[0].dtype and torch.equal(got[1], want[1])
        assert_close(got[0], want[0], equal_nan=True, rtol=0, atol=0)


def test_adversarial_near_ties_below_bf16_resolution():
    # 64 support pixels at relative distances 0.003..0.05 from query pixel 0: cosines 1 - 4.5e-6 .. 1 - 1.3e-3,
    # ~2e-5 apart. bf16 (3.9e-3 steps) sees one value, the fp32 kernel (6e-8) a strict order: every pixel is a
    # candidate and the rescoring must find the fp32 argmax.
    g = torch.Generator().manual_seed(1)
    C, Ns, Nq = 256, 64, 40
    q = torch.randn(1, C, Nq, generator=g)
    base = q[0, :, :1].expand(C, Ns).clone()  # every pixel parallel to query pixel 0...
    base += torch.randn(C, Ns, generator=g) * torch.linspace(0.003, 0.05, Ns)  # ...off by a little, each
    s = base.view(1, 1, C, Ns)
    w = torch.ones(1, 1, Ns)
    stats = {}
    certified_max_cosine(q, s, w, 1e-7, stats)
    torch.ops.fsskern._bf16_search_counts()  # read and reset
    (values, indices), (got, got_idx) = fp32_and_certified(q, s, w)
    rows, multi, rescored = torch.ops.fsskern._bf16_search_counts()  # the CPU kernel's own
    assert rows == Nq and multi >= 1 and rescored >= Nq + multi
    assert torch.equal(got_idx, indices) and got_idx[0, 0, 0] == 0  # the least perturbed pixel
    assert_close(got, values, **FP32)
    assert stats["multi"] > 0  # the rows really needed several rescorings
    exact = composed.max_cosine(q.double(), s.double(), w.double())  # the fp32 kernel ranks as fp64 does here
    assert torch.equal(indices[0, 0, :1], exact[1][0, 0, :1])


def test_duplicate_support_pixels_tie_to_the_first():
    # each support pixel repeated at three places, so every maximum is a three-way exact tie: the rescoring order
    # (the highest bound first) must still return the first index, as the fp32 kernel's scan does
    q, s, w = inputs(2, 1, 64, 40, 90, fg=1.0, seed=3)
    s = s.repeat(1, 1, 1, 3)[..., torch.randperm(120, generator=torch.Generator().manual_seed(0))]
    w = torch.ones(2, 1, 120)
    (values, indices), (got, got_idx) = fp32_and_certified(q, s, w)
    assert torch.equal(got_idx, indices)
    assert_close(got, values, **FP32)  # a rescored dot sums in its own order


def test_background_ties_and_signed_features():
    # shots where every foreground cosine is negative: the masked-out pixels' 0 (index -1) wins, as in the kernel
    q, s, w = inputs(2, 2, 16, 30, 20, fg=0.3)
    s = -q[:, :, :1].unsqueeze(1).abs().expand(2, 2, 16, 30) - 0.1
    q = q.abs()
    (values, indices), (got, got_idx) = fp32_and_certified(q, s, w)
    assert (indices == -1).all() and torch.equal(got_idx, indices) and torch.equal(got, values)


def test_gradients_and_prior_equal_the_fp32_path():
    q, s, w = inputs(2, 2, 48, 36, 25)
    q.requires_grad_()
    s.requires_grad_()
    grads = []
    for dtype in (None, BF16):
        with bf16_search("always"):
            values, _ = ops.max_cosine(q, s, w, search_dtype=dtype)
        grads.append(torch.autograd.grad((values * torch.linspace(-1, 1, values.numel()).view_as(values)).sum(),
                                         (q, s)))
    for a, b in zip(*grads):
        assert_close(a, b, **FP32)
    qm, sm, mm = torch.randn(2, 48, 6, 6), torch.randn(2, 3, 48, 5, 5), (torch.rand(2, 3, 20, 20) < 0.5).float()
    with bf16_search("always"):
        assert_close(ops.prior_mask(qm, sm, mm, search_dtype=BF16), ops.prior_mask(qm, sm, mm), **FP32)


def test_opcheck():
    q, s, w = inputs(1, 2, 12, 10, 7)
    torch.library.opcheck(torch.ops.fsskern.max_cosine_bf16_search.default, (q, s, w, 1e-7))
    torch.library.opcheck(torch.ops.fsskern.max_cosine_bf16_search.default,
                          (q.requires_grad_(), s.requires_grad_(), w, 1e-7))


def test_falls_back_to_the_fp32_kernel():
    q, s, w = inputs(1, 1, 32, 20, 15)
    want = ops.max_cosine(q, s, w)
    hardware = bf16_hardware(q.device)
    assert build_info()["bf16_search"].startswith(f"bf16 ({hardware}, " if hardware else "fp32")
    with bf16_search("never"):  # what runs on a CPU without AMX-BF16 / AVX512-BF16 ("auto" there)
        got = ops.max_cosine(q, s, w, search_dtype=BF16)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with bf16_search("always"):
        # float64 inputs, non-finite inputs and eps = 0 keep the kernel's own arithmetic and NaN rules
        exact = ops.max_cosine(q.double(), s.double(), w.double(), search_dtype=BF16)
        assert exact[0].dtype == torch.float64 and torch.equal(exact[1], want[1])
        q_nan = q.clone()
        q_nan[0, 3, 4] = float("nan")
        got, idx = ops.max_cosine(q_nan, s, w, search_dtype=BF16)
        kernel = ops.max_cosine(q_nan, s, w)
        assert_close(got, kernel[0], equal_nan=True)
        assert torch.equal(idx, kernel[1])
    with pytest.raises(ValueError, match="search_dtype must be None, torch.float32 or torch.bfloat16"):
        ops.max_cosine(q, s, w, search_dtype=torch.float16)
    with pytest.raises(ValueError, match="bf16_search: mode must be one of"):
        with bf16_search("sometimes"):
            pass
    with bf16_search("always"), pytest.raises(RuntimeError, match="batch sizes differ"):
        ops.max_cosine(q, s.expand(2, -1, -1, -1), w.expand(2, -1, -1), search_dtype=BF16)



def test_autocast_decides_before_the_search():
    # under bf16 autocast the search_dtype route used to skip the autocast cast: an error for an fp32 query beside a
    # bf16 support, and fp32 results where the default path gives autocast's
    q, s, m = torch.randn(2, 8, 5, 5), torch.randn(2, 1, 8, 6, 6), (torch.rand(2, 1, 6, 6) > 0.5).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for support in (s, s.bfloat16()):
            want = ops.prior_mask(q, support, m)
            assert torch.equal(ops.prior_mask(q, support, m, search_dtype=torch.bfloat16), want)

def test_error_bound_is_a_few_bf16_ulps():
    assert 3 * 2 ** -8 < error_bound(2048) < 3.1 * 2 ** -8


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_device_composite_runs_max_cosine_for_other_dtypes(dtype):
    """On GPUs the op is the Python composite: for inputs other than fp32 it must run max_cosine, as the CPU
    kernel does (its fp32 search buffers had failed the scatter for float64 and float16)."""
    from fsskern.ops.certified_search import device_search
    g = torch.Generator().manual_seed(0)
    q, s = torch.randn(1, 8, 6, generator=g).to(dtype), torch.randn(1, 2, 8, 5, generator=g).to(dtype)
    w = (torch.rand(1, 2, 5, generator=g) > 0.3).to(dtype)
    values, indices = device_search(q, s, w, 1e-7)
    want_values, want_indices = torch.ops.fsskern.max_cosine(q, s, w, 1e-7)
    assert values.dtype == want_values.dtype and torch.equal(values, want_values) and torch.equal(indices, want_indices)


def test_device_composite_gives_the_kernels_error_for_a_query_of_another_rank():
    """The composite sliced query[:, :, :0] before any check: a 2-d query was an IndexError."""
    from fsskern.ops.certified_search import device_search
    with pytest.raises(RuntimeError, match="query"):
        device_search(torch.randn(8, 6), torch.randn(1, 2, 8, 5), torch.ones(1, 2, 5), 1e-7)
