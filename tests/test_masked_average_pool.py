"""masked_average_pool and class_prototypes against the PFENet / PANet / POPNet references."""
import itertools

import pytest
import torch
from torch.testing import assert_close

from conftest import FP32, rounded_once, tol
from fsskern import ops, reference
from fsskern.backend import get_backend
from fsskern.reference import composed

MODES = ["mask", "features"]


def make_masks(kind, shape, dtype=torch.float32):
    if kind == "empty":
        m = torch.zeros(shape)
    elif kind == "full":
        m = torch.ones(shape)
    elif kind == "sparse":
        m = (torch.rand(shape) < 0.05).float()
    elif kind == "half":
        m = (torch.rand(shape) < 0.5).float()
    elif kind == "soft":
        m = torch.rand(shape)
    return m.to(dtype)


# (B, N, C, h, w, H, W): square and not, masks larger, equal and smaller than the features,
# PFENet's 8k+1 sizes (exact point sampling), PANet's 417 -> 53.
SHAPES = [
    (2, 1, 16, 13, 17, 97, 101),
    (1, 3, 7, 60, 60, 473, 473),
    (3, 2, 64, 9, 5, 9, 5),
    (2, 2, 33, 12, 10, 6, 7),
    (1, 5, 2048, 4, 6, 31, 45),
    (1, 1, 1, 1, 1, 8, 8),
    (5, 1, 24, 53, 53, 417, 417),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", ["empty", "full", "sparse", "half", "soft"])
def test_matches_reference(mode, shape, kind):
    B, N, C, h, w, H, W = shape
    features = torch.randn(B, C, h, w)
    masks = make_masks(kind, (B, N, H, W))
    got = ops.masked_average_pool(features, masks, resize=mode)
    want = reference.masked_average_pool(features, masks, mode)
    assert got.shape == (B, N, C)
    assert_close(got, want, **FP32)


@pytest.mark.parametrize("mode", MODES)
def test_float64_is_exact(mode):
    features = torch.randn(2, 9, 11, 7, dtype=torch.float64)
    masks = torch.rand(2, 3, 40, 29, dtype=torch.float64)
    assert_close(ops.masked_average_pool(features, masks, resize=mode),
                 reference.masked_average_pool(features, masks, mode), **tol(torch.float64))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float16, torch.float64])
def test_mask_dtypes_are_their_values(mask_dtype):
    features = torch.randn(2, 8, 10, 10)
    masks = torch.rand(2, 2, 37, 37) < 0.4
    want = reference.masked_average_pool(features, masks.float(), "mask")
    assert_close(ops.masked_average_pool(features, masks.to(mask_dtype)), want, **FP32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_reduced_precision_accumulates_in_fp32(dtype, mode):
    features = torch.randn(2, 32, 15, 15).to(dtype)
    masks = (torch.rand(2, 2, 60, 60) < 0.3).float()
    got = ops.masked_average_pool(features, masks, resize=mode)
    assert got.dtype == dtype
    want = reference.masked_average_pool(features.float(), masks, mode)
    assert_close(got.float(), want, **rounded_once(dtype))


@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs(mode):
    base = torch.randn(2, 12, 16, 24)
    features = base.transpose(2, 3)  # (2, 12, 24, 16), not contiguous
    channels_last = torch.randn(2, 12, 24, 16).contiguous(memory_format=torch.channels_last)
    masks = (torch.rand(2, 50, 3, 70) < 0.5).float().permute(0, 2, 3, 1)[:, :, :, ::2]  # (2, 3, 70, 25)
    assert not features.is_contiguous() and not masks.is_contiguous()
    for f in (features, channels_last):
        assert_close(ops.masked_average_pool(f, masks, resize=mode),
                     reference.masked_average_pool(f.contiguous(), masks.contiguous(), mode), **FP32)


@pytest.mark.parametrize("mode", MODES)
def test_all_zero_mask_gives_zero_prototype_even_without_eps(mode):
    features = torch.randn(2, 5, 8, 8)
    masks = torch.zeros(2, 2, 16, 16)
    masks[1, 0, 3:9, 2:5] = 1
    for eps in (None, 0.0):
        out = ops.masked_average_pool(features, masks, resize=mode, eps=eps)
        assert torch.isfinite(out).all()
        assert (out[0] == 0).all() and (out[1, 1] == 0).all()
        assert (out[1, 0] != 0).any()


def test_zero_size_batch_masks_channels():
    for B, N, C in [(0, 2, 4), (2, 0, 4), (2, 3, 0)]:
        out = ops.masked_average_pool(torch.randn(B, C, 5, 6), torch.ones(B, N, 10, 12))
        assert out.shape == (B, N, C)


def test_nan_and_inf_propagate_like_the_reference():
    features = torch.randn(1, 4, 6, 6)
    features[0, 1, 2, 2] = float("nan")
    features[0, 2, 0, 0] = float("inf")
    masks = torch.zeros(1, 2, 6, 6)
    masks[0, 0, 1:4, 1:4] = 1  # covers the NaN, not the Inf
    masks[0, 1, :2, :2] = 1  # covers the Inf, not the NaN
    got = ops.masked_average_pool(features, masks)
    want = reference.masked_average_pool(features, masks, "mask")
    assert_close(got, want, equal_nan=True, **FP32)
    assert torch.isnan(got[0, 0, 1]) and torch.isinf(got[0, 1, 2])


def test_features_mode_nan_in_a_pixel_the_upsampling_skips_is_documented_behaviour():
    # 9x9 features pooled under a 4x4 mask: bilinear resizing (the reference) never reads feature row/column 4,
    # the op reads every feature pixel (weight 0 there). Documented: a NaN/Inf anywhere in a channel makes
    # that channel's prototypes NaN here, while the reference can stay finite; elsewhere the two agree.
    features = torch.randn(1, 3, 9, 9)
    features[0, 1, 4, 4] = float("nan")
    masks = torch.zeros(1, 1, 4, 4)
    masks[0, 0, :2, :2] = 1
    got = ops.masked_average_pool(features, masks, resize="features")
    want = reference.masked_average_pool(features, masks, "features")
    assert torch.isnan(got[0, 0, 1]) and torch.isfinite(want[0, 0, 1])
    assert_close(got[0, 0, [0, 2]], want[0, 0, [0, 2]], **FP32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", [((6, 5), (13, 11)), ((7, 9), (4, 3)), ((5, 5), (5, 5))], ids=str)
def test_gradcheck_float64(mode, sizes):
    (h, w), (H, W) = sizes
    features = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
    masks = torch.rand(2, 2, H, W, dtype=torch.float64, requires_grad=True)
    # both outputs, so the area's gradient path is checked too
    assert torch.autograd.gradcheck(lambda f, m: torch.ops.fsskern.masked_average_pool(f, m, mode, 1e-3),
                                    (features, masks))
    assert torch.autograd.gradcheck(lambda f, m: ops.masked_average_pool(f, m, resize=mode), (features, masks))


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_reference_autograd(mode):
    features = torch.randn(3, 16, 12, 9, requires_grad=True)
    masks = torch.rand(3, 2, 47, 33, requires_grad=True)
    grad = torch.randn(3, 2, 16)
    got = torch.autograd.grad((ops.masked_average_pool(features, masks, resize=mode) * grad).sum(), (features, masks))
    want = torch.autograd.grad((reference.masked_average_pool(features, masks, mode) * grad).sum(), (features, masks))
    for g, r in zip(got, want):
        assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["fused", "reference"])
def test_outputs_may_be_edited_in_place_before_the_features_backward(name):
    """A caller's in-place edit of the prototypes or the counts (counts.clamp_(min=1)) leaves the features'
    gradient intact, as the reference's: neither is what that gradient reads."""
    features = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    masks, labels = torch.rand(2, 3, 9, 9) > 0.5, torch.randint(0, 4, (2, 9, 9))
    impl = get_backend(name)
    want = torch.autograd.grad((impl.masked_average_pool(features, masks) * 2).sum(), features)[0]
    prototypes = impl.masked_average_pool(features, masks)
    prototypes.mul_(2)
    assert_close(torch.autograd.grad(prototypes.sum(), features)[0], want)
    prototypes, counts = impl.class_prototypes(features, labels, 4)
    counts.clamp_(min=1)
    prototypes.sum().backward()
    assert features.grad is not None


def test_half_features_gradient_has_feature_dtype():
    features = torch.randn(1, 4, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    out = ops.masked_average_pool(features, torch.ones(1, 1, 9, 9))
    out.sum().backward()
    assert features.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    samples = [
        (torch.randn(2, 5, 7, 6), (torch.rand(2, 3, 15, 13) < 0.5).float()),
        (torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True),
         torch.rand(2, 3, 15, 13, dtype=torch.float64, requires_grad=True)),
        (torch.randn(1, 4, 6, 6, requires_grad=True), torch.rand(1, 2, 11, 11) < 0.5),
        (torch.randn(1, 4, 6, 6, dtype=torch.bfloat16), torch.rand(1, 2, 11, 11)),
        # channels-last features and transposed masks: the backward's fake must match its strides
        (torch.randn(2, 5, 7, 6).contiguous(memory_format=torch.channels_last).requires_grad_(),
         torch.rand(2, 3, 13, 15).transpose(2, 3).requires_grad_()),
        # no mask at all: the backward's early return must be contiguous too, as its fake
        (torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_(),
         torch.rand(2, 0, 9, 9)),
    ]
    for features, masks in samples:
        torch.library.opcheck(torch.ops.fsskern.masked_average_pool.default, (features, masks, mode, 5e-4))


BAD_INPUTS = [
    (lambda: (torch.randn(2, 3, 4), torch.ones(2, 1, 4, 4)), "features must be 4-d"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.ones(2, 4, 4)), "masks must be 4-d"),
    (lambda: (torch.randint(0, 3, (2, 3, 4, 4)), torch.ones(2, 1, 4, 4)), "features must be float32"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.ones(2, 1, 4, 4, dtype=torch.int32)), "masks must be bool, uint8"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.ones(3, 1, 4, 4)), "disagree on the batch size"),
    (lambda: (torch.randn(2, 3, 0, 4), torch.ones(2, 1, 4, 4)), "features must have a non-empty spatial size"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.ones(2, 1, 4, 0)), "masks must have a non-empty spatial size"),
    (lambda: (torch.randn(2, 3, 4, 4), torch.ones(2, 1, 4, 4, device="meta")), "must be on the same device"),
]


@pytest.mark.parametrize("make,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_inputs_raise_clear_errors(make, message):
    features, masks = make()
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fsskern.masked_average_pool(features, masks, "mask", 5e-4)


def test_bad_arguments():
    f, m = torch.randn(1, 2, 3, 3), torch.ones(1, 1, 3, 3)
    with pytest.raises(ValueError, match="resize must be one of"):
        ops.masked_average_pool(f, m, resize="nearest")
    with pytest.raises(RuntimeError, match="resize must be 'mask' or 'features'"):
        torch.ops.fsskern.masked_average_pool(f, m, "bicubic", 1e-5)
    for eps in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="eps must be finite and >= 0"):
            ops.masked_average_pool(f, m, eps=eps)


# ---- class_prototypes ---------------------------------------------------------------------

def random_labels(B, H, W, num_classes, ignore=255):
    labels = torch.randint(0, num_classes, (B, H, W))
    labels[torch.rand(B, H, W) < 0.1] = ignore
    labels[:, : H // 4] = torch.where(labels[:, : H // 4] == 1, 0, labels[:, : H // 4])
    labels[0][labels[0] == 1] = 0  # class 1 absent from image 0
    return labels


def test_class_prototypes_nearest_matches_popnet():
    features = torch.randn(2, 32, 15, 20)
    labels = random_labels(2, 60, 80, 6)
    got, counts = ops.class_prototypes(features, labels, 6, resize="nearest")
    want, want_counts = reference.class_prototypes_popnet(features, labels, 6)
    assert_close(got, want, **FP32)
    assert_close(counts, want_counts.float(), **FP32)
    assert (got[0, 1] == 0).all()


@pytest.mark.parametrize("mode", ["nearest", "mask", "features"])
def test_class_prototypes_counts_stay_exact_in_bf16(mode):
    """Both backends give the areas in float32 for bf16 features: a bf16 count of 1,801 pixels would be 1,800
    (POPNet weights a class over several supports by these counts)."""
    features = torch.randn(1, 4, 60, 60).bfloat16()
    labels = torch.zeros(1, 60, 60, dtype=torch.long)
    labels.view(-1)[:1801] = 1
    got = ops.class_prototypes(features, labels, 2, resize=mode)[1]
    want = composed.class_prototypes(features, labels, 2, resize=mode)[1]
    assert got.dtype == want.dtype == torch.float32
    assert_close(got, want, rtol=1e-6, atol=1e-3)
    assert got[0, 1].item() == 1801


@pytest.mark.parametrize("mode", MODES)
def test_class_prototypes_equal_per_class_masked_average_pool(mode):
    features = torch.randn(2, 16, 9, 11)
    labels = random_labels(2, 33, 41, 4)
    got, counts = ops.class_prototypes(features, labels, 4, resize=mode)
    masks = torch.stack([(labels == c).float() for c in range(4)], 1)
    assert_close(got, reference.masked_average_pool(features, masks, mode), **FP32)
    if mode == "features":
        assert_close(counts, masks.sum((2, 3)), **FP32)


@pytest.mark.parametrize("resize", ["mask", "features", "nearest"])
@pytest.mark.parametrize("impl", [ops.class_prototypes, composed.class_prototypes], ids=["op", "reference"])
@pytest.mark.parametrize("ignore_index", [0, 2])
def test_class_prototypes_ignore_index_inside_the_class_range_pools_nothing(impl, resize, ignore_index):
    # ignore_index = 0 (or 255 with more than 255 classes) is a class id too: its pixels used to pool into it.
    features = torch.randn(2, 8, 6, 7)
    labels = random_labels(2, 12, 14, 4, ignore=ignore_index)
    got, counts = impl(features, labels, 4, ignore_index=ignore_index, resize=resize)
    renamed = torch.where(labels == ignore_index, 255, labels)  # the same map with the default ignore_index
    want, want_counts = impl(features, renamed, 4, resize=resize)
    assert_close(got, want, **FP32)
    assert_close(counts, want_counts, **FP32)
    assert (counts[:, ignore_index] == 0).all() and (got[:, ignore_index] == 0).all()


def test_class_prototypes_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        ops.class_prototypes(torch.randn(1, 2, 4, 4), torch.tensor([[[0, 1], [2, 7]]]), 3)
    with pytest.raises(ValueError, match="integer"):
        ops.class_prototypes(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 4), 3)
    # empty grids used to reach F.interpolate ("Input and output sizes should be greater than 0")
    for resize in ("nearest", "mask", "features"):
        with pytest.raises(ValueError, match=r"class_prototypes: features must have a non-empty spatial size"):
            ops.class_prototypes(torch.randn(1, 2, 0, 4), torch.zeros(1, 4, 4, dtype=torch.long), 3, resize=resize)
        with pytest.raises(ValueError, match=r"class_prototypes: labels must have a non-empty spatial size"):
            ops.class_prototypes(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 0, dtype=torch.long), 3, resize=resize)


def test_mask_mode_point_samples_at_8k_plus_1_sizes():
    # At PFENet's sizes (65 -> 9, align_corners) the mask resize samples mask pixels 0, 8, ..., 64 exactly:
    # an oracle that shares no code with the op or the reference
    features = torch.randn(1, 8, 9, 9, dtype=torch.float64)
    masks = (torch.rand(1, 2, 65, 65) < 0.5).double()
    sampled = masks[..., ::8, ::8]  # (1, 2, 9, 9)
    want = torch.einsum("bnhw,bchw->bnc", sampled, features) / (sampled.sum((2, 3))[..., None] + 5e-4)
    assert_close(ops.masked_average_pool(features, masks, resize="mask", eps=5e-4), want)


@pytest.mark.parametrize("threads", [2, 4])
def test_deterministic_across_thread_counts(threads):
    features = torch.randn(3, 40, 20, 20)
    masks = torch.rand(3, 4, 81, 81)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        a = [ops.masked_average_pool(features, masks, resize=m) for m in MODES]
        torch.set_num_threads(1)
        b = [ops.masked_average_pool(features, masks, resize=m) for m in MODES]
    finally:
        torch.set_num_threads(previous)
    for x, y in itertools.zip_longest(a, b):
        assert torch.equal(x, y)


def test_double_backward_raises_instead_of_a_wrong_second_derivative():
    """The backward ops have no derivative of their own: a second derivative through them must be refused
    (without an Autograd kernel torch only warned and returned a wrong number)."""
    f = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    m = torch.rand(2, 1, 9, 9, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad((ops.masked_average_pool(f, m) ** 2).sum(), f, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for fsskern::_masked_average_pool_backward_features is not"):
        torch.autograd.grad(g.sum(), m)
