"""Every fsskern op on a real GPU: against its pure-PyTorch reference run on the GPU and against the
CPU kernel (values, gradients, the same dropout mask for the same seed, identical integer results
of the clustering), opcheck on CUDA tensors, bad inputs on CUDA (a CPU tensor among CUDA ones
included) and torch.compile on CUDA.

Collected everywhere, skipped without a CUDA device; `make gpu-check` runs them (pytest -k cuda).
The shapes are the CPU suites' own parametrisations (imported), so CUDA meets the same edge cases.
The first CPU-vs-CUDA comparisons live in test_build.py and are not repeated here.
"""
import pytest
import torch
from torch.testing import assert_close

from conftest import CUDA, FP32, tol
from fsskern import nn as fnn
from fsskern import ops, reference
from fsskern.reference import composed
from test_attention import LOCAL_SHAPES, PROTO_SHAPES, local_mask, random_valid
from test_compile import PriorAndPrototype
from test_masked_average_pool import BAD_INPUTS as MAP_BAD_INPUTS
from test_masked_average_pool import MODES
from test_masked_average_pool import SHAPES as MAP_SHAPES
from test_masked_average_pool import make_masks
from test_prior_mask import BAD as PRIOR_BAD
from test_prior_mask import SHAPES as PRIOR_SHAPES
from test_prior_mask import inputs as prior_inputs

pytestmark = [pytest.mark.cuda, CUDA]
GRAD = dict(rtol=1e-4, atol=1e-5)  # gradients sum in another order on the GPU


def cuda(*tensors, grad=False):
    """Copies on the GPU (leaves that require grad when `grad`)."""
    out = [t.detach().cuda().requires_grad_(grad) for t in tensors]
    return out[0] if len(out) == 1 else out


def assert_grads_match(outs, inputs, grad_out):
    """The gradients of each (output, inputs) pair for the same upstream gradient agree (on the CPU)."""
    grads = [torch.autograd.grad(o, i, grad_out.to(o.device)) for o, i in zip(outs, inputs)]
    for got in grads[1:]:
        for a, b in zip(grads[0], got):
            assert_close(b.cpu(), a.cpu(), **(tol(a.dtype) if a.dtype == torch.float64 else GRAD))


# ---- masked_average_pool / class_prototypes ------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", MAP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["empty", "full", "sparse", "half", "soft"])
def test_masked_average_pool(mode, shape, kind):
    B, N, C, h, w, H, W = shape
    features, masks = torch.randn(B, C, h, w), make_masks(kind, (B, N, H, W))
    got = ops.masked_average_pool(*cuda(features, masks), resize=mode)
    assert got.is_cuda
    assert_close(got, reference.masked_average_pool(*cuda(features, masks), mode), **FP32)
    assert_close(got.cpu(), ops.masked_average_pool(features, masks, resize=mode), **FP32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_average_pool_gradients(mode, dtype):
    features = torch.randn(3, 16, 12, 9, dtype=dtype, requires_grad=True)
    masks = torch.rand(3, 2, 47, 33, dtype=dtype, requires_grad=True)
    f, m = cuda(features, masks, grad=True)
    fr, mr = cuda(features, masks, grad=True)
    outs = [ops.masked_average_pool(features, masks, resize=mode), ops.masked_average_pool(f, m, resize=mode),
            reference.masked_average_pool(fr, mr, mode)]
    assert_grads_match(outs, [(features, masks), (f, m), (fr, mr)], torch.randn(3, 2, 16, dtype=dtype))


@pytest.mark.parametrize("mode", MODES)
def test_masked_average_pool_dtypes_and_layouts(mode):
    features = torch.randn(2, 12, 24, 16)
    for f in (features, features.transpose(2, 3), features.contiguous(memory_format=torch.channels_last),
              features.bfloat16(), features.half(), features.double()):
        for masks in ((torch.rand(2, 3, 50, 70) < 0.4), torch.rand(2, 70, 3, 50).permute(0, 2, 3, 1)):
            got = ops.masked_average_pool(*cuda(f, masks), resize=mode)
            assert got.dtype == f.dtype
            # reduced precision: fp32 sums rounded once to the output dtype on either device, an ulp apart at most
            close = tol(f.dtype) if f.dtype.itemsize >= 4 else dict(rtol=float(torch.finfo(f.dtype).eps), atol=1e-6)
            assert_close(got.cpu(), ops.masked_average_pool(f, masks, resize=mode), **close)


def test_class_prototypes():
    features, labels = torch.randn(2, 16, 9, 11), torch.randint(0, 4, (2, 33, 41))
    labels[torch.rand(2, 33, 41) < 0.1] = 255
    for mode in MODES + ["nearest"]:
        got, counts = ops.class_prototypes(*cuda(features, labels), 4, resize=mode)
        want, want_counts = ops.class_prototypes(features, labels, 4, resize=mode)
        assert_close(got.cpu(), want, **FP32)
        assert_close(counts.cpu(), want_counts, **FP32)


# ---- prior_mask / max_cosine ---------------------------------------------------------------------

@pytest.mark.parametrize("shape", PRIOR_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fg", [0.05, 0.3, 0.5, "empty", "full"])
@pytest.mark.parametrize("signed", [False, True], ids=["relu", "signed"])
def test_prior_mask(shape, fg, signed):
    q, s, m = prior_inputs(*shape, fg=fg, signed=signed)
    for normalize in (True, False):
        for reduce in ("mean", None):
            got = ops.prior_mask(*cuda(q, s, m), normalize=normalize, reduce=reduce)
            assert_close(got, reference.prior_mask(*cuda(q, s, m), normalize=normalize, reduce=reduce), **FP32)
            assert_close(got.cpu(), ops.prior_mask(q, s, m, normalize=normalize, reduce=reduce), **FP32)


def test_max_cosine_argmax_is_a_maximum():
    # The GPU may round a near-tie the other way, so the index is checked by the value it points at.
    q, s, m = prior_inputs(2, 2, 10, 9, 8, 7, 6, 7, 6, 0.5, False)
    qc, sc, wc = cuda(q.flatten(2), s.flatten(3), m.flatten(2))
    values, idx = ops.max_cosine(qc, sc, wc)
    cpu_values, cpu_idx = ops.max_cosine(q.flatten(2), s.flatten(3), m.flatten(2))
    assert_close(values.cpu(), cpu_values, **FP32)
    sm = sc * wc[:, :, None]
    cos = torch.einsum("bkcs,bcq->bksq", sm, qc) / (sm.norm(dim=2)[..., None] * qc.norm(dim=1)[:, None, None] + 1e-7)
    fg = idx >= 0
    assert torch.equal(fg.cpu(), cpu_idx >= 0)
    picked = cos.gather(2, idx.clamp(min=0).unsqueeze(2)).squeeze(2)
    assert_close(picked[fg], values[fg], **FP32)


def test_prior_mask_gradients_and_float64():
    for dtype in (torch.float32, torch.float64):
        q, s, m = prior_inputs(2, 3, 24, 9, 11, 8, 8, 30, 30, 0.4, True, dtype=dtype)
        q.requires_grad_()
        s.requires_grad_()
        qc, sc = cuda(q, s, grad=True)
        qr, sr = cuda(q, s, grad=True)
        outs = [ops.prior_mask(q, s, m), ops.prior_mask(qc, sc, m.cuda()), reference.prior_mask(qr, sr, m.cuda())]
        assert_grads_match(outs, [(q, s), (qc, sc), (qr, sr)], torch.randn(2, 1, 9, 11, dtype=dtype))


def test_prior_mask_backward_is_flagged_nondeterministic():
    """grad_support is accumulated with float atomics on CUDA: deterministic mode must refuse it, as PyTorch's
    own atomic scatters do."""
    q, s, m = prior_inputs(1, 1, 8, 5, 5, 4, 4, 5, 5, 0.5, True)
    qc, sc = cuda(q, s, grad=True)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="max_cosine backward"):
            ops.prior_mask(qc, sc, m.cuda()).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


# ---- lsh_hash / hamming_kmeans / cluster_means / support_prototypes: identical on both devices ------

@pytest.mark.parametrize("bits", [1, 7, 32, 61, 64])
@pytest.mark.parametrize("E", [1, 16, 37, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lsh_hash_identical(bits, E, dtype):
    g = torch.Generator().manual_seed(bits * E)
    x = torch.randn(2, 700, E, generator=g, dtype=dtype)
    planes = ops.lsh_planes(bits, E, generator=g, dtype=dtype)
    codes = ops.lsh_hash(*cuda(x, planes))
    assert torch.equal(codes.cpu(), ops.lsh_hash(x, planes))
    # channel-first maps hashed in place, as support_prototypes does
    maps = torch.randn(3, E, 5, 7, generator=g, dtype=dtype)
    assert torch.equal(ops.lsh_hash(cuda(maps).flatten(2).transpose(1, 2), cuda(planes)).cpu(),
                       ops.lsh_hash(maps.flatten(2).transpose(1, 2), planes))
    if dtype == torch.float64:
        assert torch.equal(codes, reference.clustering.lsh_hash(*cuda(x, planes)))


@pytest.mark.parametrize("bits", [1, 8, 32, 64])
@pytest.mark.parametrize("k,iters", [(1, 3), (5, 10), (20, 0), (50, 10)])
def test_hamming_kmeans_identical(bits, k, iters):
    g = torch.Generator().manual_seed(bits + k)
    codes = ops.lsh_hash(torch.randn(3 * 900, 24, generator=g), ops.lsh_planes(bits, 24, generator=g)).view(3, 900)
    valid = torch.rand(3, 900, generator=g) < 0.7
    valid[2] = False
    valid[2, :k] = True  # exactly k valid points
    init = ops.draw_init(valid, k, g)
    cpu = ops.hamming_kmeans(codes, k, iters=iters, valid=valid, init=init)
    gpu = ops.hamming_kmeans(cuda(codes), k, iters=iters, valid=cuda(valid), init=cuda(init))
    ref = reference.clustering.hamming_kmeans(cuda(codes), k, iters, cuda(valid), cuda(init))
    for c, gp, r in zip(cpu, gpu, ref):
        assert torch.equal(gp.cpu(), c) and torch.equal(gp, r)
    # seeded through a generator: the same draws on either device
    a = ops.hamming_kmeans(cuda(codes), k, iters=iters, generator=torch.Generator().manual_seed(3))
    b = ops.hamming_kmeans(codes, k, iters=iters, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x.cpu(), y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cluster_means(dtype):
    features = torch.randn(2, 3, 37, 4, 5).to(dtype)  # channel-first maps, read in place
    tokens = features.permute(0, 1, 3, 4, 2).reshape(2, 60, 37)
    assign = torch.randint(-1, 6, (2, 60))
    assign[1][assign[1] == 4] = 5  # an empty cluster
    for f in (features, tokens):
        means, counts = ops.cluster_means(cuda(f), cuda(assign), 6)
        want, want_counts = ops.cluster_means(f, assign, 6)
        assert torch.equal(counts.cpu(), want_counts)
        assert_close(means.cpu(), want, **(tol(dtype) if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-2)))
    if dtype != torch.bfloat16:
        assert_close(means, reference.clustering.cluster_means(*cuda(tokens, assign), 6)[0], **tol(dtype))


def test_cluster_means_gradients():
    features = torch.randn(2, 300, 70, requires_grad=True)
    assign = torch.randint(-1, 9, (2, 300))
    fc, fr = cuda(features, grad=True), cuda(features, grad=True)
    outs = [ops.cluster_means(features, assign, 9)[0], ops.cluster_means(fc, cuda(assign), 9)[0],
            reference.clustering.cluster_means(fr, cuda(assign), 9)[0]]
    assert_grads_match(outs, [(features,), (fc,), (fr,)], torch.randn(2, 9, 70))


@pytest.mark.parametrize("fg", ["sparse", "none", "all", "tiny"])
def test_support_prototypes_identical_clusters(fg):
    features = torch.randn(2, 3, 64, 20, 20, requires_grad=True)
    masks = (torch.rand(2, 3, 80, 80) < 0.3).float()
    if fg == "none":
        masks[0] = 0
    elif fg == "all":
        masks[1] = 1
    elif fg == "tiny":  # fewer foreground tokens than clusters: the tokens are the prototypes
        masks[:] = 0
        masks[:, 0, 30:40, 30:40] = 1
    fc = cuda(features, grad=True)
    seeded = lambda: torch.Generator().manual_seed(9)  # noqa: E731  (the same draws for every side)
    cpu, cpu_valid = ops.support_prototypes(features, masks, generator=seeded())
    gpu, gpu_valid = ops.support_prototypes(fc, masks.cuda(), generator=seeded())
    ref, ref_valid = composed.support_prototypes(cuda(features), masks.cuda(), generator=seeded())
    assert torch.equal(gpu_valid.cpu(), cpu_valid) and torch.equal(gpu_valid, ref_valid)
    assert_close(gpu.cpu(), cpu, **FP32)
    assert_close(gpu, ref, **FP32)
    assert_grads_match([cpu, gpu], [(features,), (fc,)], torch.randn_like(cpu))


# ---- prototype_attention / local_conditional_attention ---------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", PROTO_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_prototype_attention(dtype, shape):
    B, H, N, D, Dv, P = shape
    q, k, v = torch.randn(B, H, N, D, dtype=dtype), torch.randn(B, H, P, D, dtype=dtype), \
        torch.randn(B, H, P, Dv, dtype=dtype)
    valid = random_valid(B, P)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    qc, kc, vc = cuda(q, k, v, grad=True)
    qr, kr, vr = cuda(q, k, v, grad=True)
    outs = [ops.prototype_attention(q, k, v, key_valid=valid),
            ops.prototype_attention(qc, kc, vc, key_valid=valid.cuda()),
            reference.attention.prototype_attention(qr, kr, vr, valid.cuda())]
    for out in outs[1:]:
        assert_close(out.cpu(), outs[0], **tol(dtype))
    assert_grads_match(outs, [(q, k, v), (qc, kc, vc), (qr, kr, vr)], torch.randn_like(outs[0]))


def keep_mask(B, H, N, P, p, seed, device):
    """The dropout keep mask read back through the op (test_attention.dropout_keep_mask, on `device`)."""
    out = ops.prototype_attention(torch.zeros(B, H, N, 1, dtype=torch.float64, device=device),
                                  torch.zeros(B, H, P, 1, dtype=torch.float64, device=device),
                                  torch.eye(P, dtype=torch.float64, device=device).expand(B, H, P, P),
                                  dropout_p=p, seed=seed)
    return (out * (1 - p) * P).round().bool().cpu()


@pytest.mark.parametrize("shape", [(2, 3, 40, 9), (1, 2, 700, 600)], ids=str)
def test_prototype_attention_same_dropout_mask(shape):
    B, H, N, P = shape
    keep = keep_mask(B, H, N, P, 0.25, 123, "cpu")
    assert torch.equal(keep_mask(B, H, N, P, 0.25, 123, "cuda"), keep)
    assert not torch.equal(keep_mask(B, H, N, P, 0.25, 124, "cuda"), keep)
    q, k, v = torch.randn(B, H, N, 8, dtype=torch.float64), torch.randn(B, H, P, 8, dtype=torch.float64), \
        torch.randn(B, H, P, 4, dtype=torch.float64)
    valid = random_valid(B, P)
    got = ops.prototype_attention(*cuda(q, k, v), key_valid=valid.cuda(), dropout_p=0.25, seed=123)
    want = reference.attention.prototype_attention(*cuda(q, k, v), valid.cuda(), dropout_p=0.25,
                                                   dropout_keep=keep.cuda())
    assert_close(got, want, **tol(torch.float64))
    assert_close(got.cpu(), ops.prototype_attention(q, k, v, key_valid=valid, dropout_p=0.25, seed=123),
                 **tol(torch.float64))


def test_prototype_attention_edge_cases():
    q, k, v = torch.randn(2, 2, 9, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 3)
    valid = random_valid(2, 5)
    valid[1] = False  # every key of image 1 invalid: a zero output
    out = ops.prototype_attention(*cuda(q, k, v), key_valid=valid.cuda())
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close(out.cpu(), ops.prototype_attention(q, k, v, key_valid=valid), **FP32)
    assert ops.prototype_attention(*cuda(q[:, :, :0], k, v)).shape == (2, 2, 0, 3)
    strided = torch.randn(2, 20, 3, 8).transpose(1, 2), torch.randn(2, 3, 8, 6).transpose(2, 3), torch.randn(2, 3, 6, 5)
    assert_close(ops.prototype_attention(*cuda(*strided)).cpu(), ops.prototype_attention(*strided), **FP32)


@pytest.mark.parametrize("mode", ["exclude", "multiply"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", LOCAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_local_conditional_attention(mode, dtype, shape):
    B, C, Nq, Ns, Cv = shape
    query, support = torch.randn(B, C, Nq, dtype=dtype, requires_grad=True), \
        torch.randn(B, C, Ns, dtype=dtype, requires_grad=True)
    value = torch.randn(B, Cv, Ns, dtype=dtype, requires_grad=True)
    mask = local_mask(B, Ns)
    gpu, ref = cuda(query, support, value, grad=True), cuda(query, support, value, grad=True)
    outs = [ops.local_conditional_attention(query, support, mask, value=value, mode=mode),
            ops.local_conditional_attention(*gpu[:2], mask.cuda(), value=gpu[2], mode=mode),
            reference.attention.local_conditional_attention(*ref[:2], mask.cuda(), ref[2], mode)]
    for out in outs[1:]:
        assert_close(out.cpu(), outs[0], **tol(dtype))
    assert_grads_match(outs, [(query, support, value), tuple(gpu), tuple(ref)], torch.randn_like(outs[0]))


# ---- opcheck on CUDA -----------------------------------------------------------------------------

def test_opcheck():
    f = torch.randn(2, 5, 7, 6, device="cuda", requires_grad=True)
    m = torch.rand(2, 3, 15, 13, device="cuda")
    for mode in MODES:
        torch.library.opcheck(torch.ops.fsskern.masked_average_pool.default, (f, m, mode, 5e-4))
        torch.library.opcheck(torch.ops.fsskern.masked_average_pool.default,
                              (f.detach().double().requires_grad_(), m.double().requires_grad_(), mode, 5e-4))
    q, s, w = torch.randn(2, 5, 24, device="cuda"), torch.randn(2, 2, 5, 15, device="cuda"), \
        (torch.rand(2, 2, 15, device="cuda") < 0.5).float()
    for grad in (False, True):
        torch.library.opcheck(torch.ops.fsskern.max_cosine.default,
                              (q.clone().requires_grad_(grad), s.clone().requires_grad_(grad), w, 1e-7))
    x, planes = torch.randn(3, 40, 6, device="cuda"), torch.randn(8, 7, device="cuda")
    torch.library.opcheck(torch.ops.fsskern.lsh_hash.default, (x, planes))
    torch.library.opcheck(torch.ops.fsskern.lsh_hash.default, (x.transpose(1, 2).contiguous().transpose(1, 2), planes))
    codes = ops.lsh_hash(x[:2], planes)
    valid = torch.rand(2, 40, device="cuda") < 0.5
    init = ops.draw_init(valid, 5, torch.Generator().manual_seed(4))
    torch.library.opcheck(torch.ops.fsskern.hamming_kmeans.default, (codes, valid, init, 5, 4))
    feats = torch.randn(2, 40, 5, device="cuda", dtype=torch.float64, requires_grad=True)
    assign = torch.randint(-1, 4, (2, 40), device="cuda")
    torch.library.opcheck(torch.ops.fsskern.cluster_means.default, (feats, assign, 4, 1e-3))
    torch.library.opcheck(torch.ops.fsskern.cluster_means.default, (feats.detach().float(), assign, 4, 0.0))
    qa, ka, va = (torch.randn(2, 2, n, d, device="cuda") for n, d in ((9, 4), (5, 4), (5, 3)))
    op = torch.ops.fsskern.prototype_attention.default
    torch.library.opcheck(op, (qa, ka, va, random_valid(2, 5).cuda(), 0.5, 0.0, 0))
    torch.library.opcheck(op, (qa.double().requires_grad_(), ka.double().requires_grad_(),
                               va.double().requires_grad_(), None, 0.5, 0.2, 7))
    ql, sl, vl = torch.randn(2, 4, 10, device="cuda"), torch.randn(2, 4, 12, device="cuda"), \
        torch.randn(2, 3, 12, device="cuda")
    ml = (torch.rand(2, 12, device="cuda") < 0.5).float()
    for mode in ("exclude", "multiply"):
        torch.library.opcheck(torch.ops.fsskern.local_conditional_attention.default, (ql, sl, ml, vl, mode))
        torch.library.opcheck(torch.ops.fsskern.local_conditional_attention.default,
                              (ql.double().requires_grad_(), sl.double().requires_grad_(), ml.bool(),
                               vl.double().requires_grad_(), mode))


# ---- bad inputs on CUDA --------------------------------------------------------------------------

def on_cuda(t):
    return t.cuda() if isinstance(t, torch.Tensor) and t.device.type == "cpu" else t


@pytest.mark.parametrize("make,message", MAP_BAD_INPUTS, ids=[m for _, m in MAP_BAD_INPUTS])
def test_masked_average_pool_bad_inputs(make, message):
    features, masks = (on_cuda(t) for t in make())
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fsskern.masked_average_pool(features, masks, "mask", 5e-4)


@pytest.mark.parametrize("override,error,message", PRIOR_BAD, ids=[m for _, _, m in PRIOR_BAD])
def test_prior_mask_bad_inputs(override, error, message):
    args = dict(query=torch.randn(2, 4, 5, 5), support=torch.randn(2, 1, 4, 5, 5), support_masks=torch.ones(2, 1, 5, 5))
    args.update(override)
    with pytest.raises(error, match=message):
        ops.prior_mask(**{k: on_cuda(v) for k, v in args.items()})


# One CPU tensor among CUDA ones, for every op: a clear error, never a crash or a silent copy.
DEVICE_MIX = [
    (lambda: ops.masked_average_pool(torch.randn(2, 3, 4, 4, device="cuda"), torch.ones(2, 1, 4, 4)),
     "must be on the same"),
    (lambda: ops.max_cosine(torch.randn(1, 4, 9, device="cuda"), torch.randn(1, 1, 4, 6), torch.ones(1, 1, 6)),
     "one device"),
    (lambda: ops.prior_mask(torch.randn(2, 4, 5, 5, device="cuda"), torch.randn(2, 1, 4, 5, 5, device="cuda"),
                            torch.ones(2, 1, 5, 5)), "same device|one device"),
    (lambda: ops.lsh_hash(torch.randn(10, 8, device="cuda"), ops.lsh_planes(4, 8)), "one device"),
    (lambda: ops.hamming_kmeans(torch.zeros(1, 10, dtype=torch.long, device="cuda"), 2,
                                valid=torch.ones(1, 10, dtype=torch.bool), init=torch.tensor([[0, 1]])), "one device"),
    (lambda: ops.cluster_means(torch.randn(1, 10, 4, device="cuda"), torch.zeros(1, 10, dtype=torch.long), 3),
     "one device"),
    (lambda: ops.prototype_attention(torch.randn(1, 1, 5, 4, device="cuda"), torch.randn(1, 1, 3, 4),
                                     torch.randn(1, 1, 3, 4, device="cuda")), "one device"),
    (lambda: ops.prototype_attention(*(torch.randn(1, 1, n, 4, device="cuda") for n in (5, 3, 3)),
                                     key_valid=torch.ones(1, 3, dtype=torch.bool)), "key_valid must be on"),
    (lambda: ops.local_conditional_attention(torch.randn(1, 4, 6, device="cuda"), torch.randn(1, 4, 7, device="cuda"),
                                             torch.ones(1, 7)), "support_mask must be on"),
]


@pytest.mark.parametrize("call,message", DEVICE_MIX, ids=[f"{i}-{m}" for i, (_, m) in enumerate(DEVICE_MIX)])
def test_cpu_tensor_among_cuda_tensors(call, message):
    with pytest.raises(RuntimeError, match=message):
        call()


def test_attention_bad_inputs():
    q, k, v = (torch.randn(2, 3, n, d, device="cuda") for n, d in ((10, 4), (5, 4), (5, 6)))
    with pytest.raises(RuntimeError, match="float32, float64, float16 or bfloat16"):
        ops.prototype_attention(q.int(), k.int(), v.int())
    with pytest.raises(RuntimeError, match="must share D"):
        ops.prototype_attention(q, k[..., :3], v)
    with pytest.raises(RuntimeError, match=r"key_valid must be \(B, P\) = \(2, 5\)"):
        ops.prototype_attention(q, k, v, key_valid=torch.ones(2, 4, dtype=torch.bool, device="cuda"))
    query, support, mask = (torch.randn(2, 4, 10, device="cuda"), torch.randn(2, 4, 12, device="cuda"),
                            torch.ones(2, 12, device="cuda"))
    with pytest.raises(RuntimeError, match="only 0 and 1"):
        ops.local_conditional_attention(query, support, mask * 0.5)
    with pytest.raises(RuntimeError, match="channel counts differ"):
        ops.local_conditional_attention(query[:, :3], support, mask)


def test_clustering_bad_inputs():
    codes = torch.zeros(1, 30, dtype=torch.long, device="cuda")
    with pytest.raises(RuntimeError, match="distinct valid points"):
        ops.hamming_kmeans(codes, 3, init=torch.tensor([[1, 1, 2]], device="cuda"))
    with pytest.raises(RuntimeError, match=r"init indices must lie in \[0, 30\)"):
        ops.hamming_kmeans(codes, 3, init=torch.tensor([[1, 2, 30]], device="cuda"))
    with pytest.raises(RuntimeError, match=r"assign must lie in \[-1, 3\)"):
        ops.cluster_means(torch.randn(1, 10, 4, device="cuda"), torch.full((1, 10), 3, device="cuda"), 3)
    with pytest.raises(RuntimeError, match="dtype of x"):
        ops.lsh_hash(torch.randn(3, 8, device="cuda"), torch.randn(4, 9, dtype=torch.float64, device="cuda"))


# ---- torch.compile on CUDA -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_prior_and_prototype(backend):
    torch._dynamo.reset()
    model = PriorAndPrototype(16).cuda()
    query = torch.randn(2, 16, 9, 11, device="cuda", requires_grad=True)
    support = torch.randn(2, 3, 16, 9, 9, device="cuda", requires_grad=True)
    masks = (torch.rand(2, 3, 33, 33, device="cuda") < 0.4).float()
    eager = model(query, support, masks)
    eager_grads = torch.autograd.grad(eager.square().sum(), (query, support))
    out = torch.compile(model, fullgraph=True, backend=backend)(query, support, masks)
    grads = torch.autograd.grad(out.square().sum(), (query, support))
    assert_close(out, eager, **GRAD)
    for a, b in zip(grads, eager_grads):
        assert_close(a, b, **GRAD)


def test_compile_prototype_cross_attention():
    torch._dynamo.reset()
    layer = fnn.PrototypeCrossAttention(32, heads=4, dropout=0.1).cuda().eval()
    x = torch.randn(2, 45, 32, device="cuda", requires_grad=True)
    prototypes, valid = torch.randn(2, 7, 32, device="cuda"), random_valid(2, 7).cuda()
    out = layer(x, prototypes, valid)
    compiled = torch.compile(layer, fullgraph=True)
    assert_close(compiled(x, prototypes, valid), out, **FP32)
    layer.train()  # dropout through the fused op's seed, compiled
    train_out = torch.compile(layer, backend="aot_eager")(x, prototypes, valid)
    train_out.sum().backward()
    assert layer.to_q.weight.grad is not None and not torch.equal(train_out, out)


# ---- float16 / bfloat16: the CUDA kernels read them as they are, float32 inside ---------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_matches_cpu(dtype, monkeypatch):
    # the CPU kernels' widened path, which computes as the CUDA kernels do (the bf16 products, on hosts with
    # AVX512-BF16, round the probabilities: tests/test_reduced_precision.py)
    monkeypatch.setenv("FSSKERN_BF16_DOT", "0")
    unit = 2 ** -8 if dtype == torch.bfloat16 else 2 ** -11
    q, k, v = (torch.randn(2, 4, n, 32).to(dtype) for n in (500, 70, 70))
    out = ops.prototype_attention(*cuda(q, k, v))
    assert out.dtype == dtype
    assert_close(out.cpu().float(), ops.prototype_attention(q, k, v).float(), rtol=2 * unit, atol=1e-5)
    query, support = torch.randn(2, 64, 300).to(dtype), torch.randn(2, 64, 400).to(dtype)
    mask = (torch.rand(2, 400) < 0.3).float()
    for mode in ("exclude", "multiply"):
        got = ops.local_conditional_attention(*cuda(query, support, mask), mode=mode)
        assert_close(got.cpu().float(), ops.local_conditional_attention(query, support, mask, mode=mode).float(),
                     rtol=4 * unit, atol=unit)
    qc, sc = torch.randn(2, 64, 300).to(dtype), torch.randn(2, 2, 64, 250).to(dtype)
    w = (torch.rand(2, 2, 250) < 0.5).to(dtype)
    values, idx = ops.max_cosine(*cuda(qc, sc, w))
    want, want_idx = ops.max_cosine(qc, sc, w)
    assert values.dtype == torch.float32
    assert_close(values.cpu(), want, **FP32)
    assert (idx.cpu() == want_idx).float().mean() > 0.999  # near-ties may flip on another summation order
    x, planes = torch.randn(3, 500, 32).to(dtype), ops.lsh_planes(32, 32)
    assert torch.equal(ops.lsh_hash(*cuda(x, planes)).cpu(), ops.lsh_hash(x, planes))
    with torch.autocast("cuda", dtype=dtype):
        assert ops.prototype_attention(*cuda(q.float(), k.float(), v.float())).dtype == dtype
