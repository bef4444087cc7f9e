"""fsskern.compat against pure-PyTorch transcriptions of the public code (tests/compat_transcriptions.py).

Outputs and gradients within fp32 rtol/atol 1e-5 (calDist's x20 scores: atol 2e-4; the prior and a
tiny-area mask also in fp64 at 1e-10), on random features and on features of real MSRC-v2 photos
through a small random-init conv net (real image statistics), with the public code's quirks:
255 as background, eps placement, align_corners, batch > 1, k-shot."""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compat_transcriptions as T
from conftest import FP32
from fsskern import ops
from fsskern.compat import panet, pfenet, popnet, umtfss

MSRC = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "msrc_v2"
IMAGES = ["1_1_s", "2_1_s", "3_1_s", "4_1_s"]
SIZE = 65  # 8k + 1 as in PFENet; a stride-8 net gives 9 x 9 features


def close(a, b, **tol):
    torch.testing.assert_close(a, b, **(tol or FP32))


def grads(fn, *inputs):
    """Output of fn and the gradients of a fixed random projection of it w.r.t. inputs."""
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*inputs)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return out.detach(), torch.autograd.grad((out * weight).sum(), inputs)


def check(fn_ours, fn_theirs, *inputs, **tol):
    out, g = grads(fn_ours, *inputs)
    ref, g_ref = grads(fn_theirs, *inputs)
    close(out, ref, **tol)
    for a, b in zip(g, g_ref):
        close(a, b, **tol)


# ---- inputs -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real():
    """Post-ReLU 32-channel 9x9 features of 4 MSRC photos (random-init net, fixed seed) and their
    labels at 65x65 (MSRC void 0 -> 255, class ids kept)."""
    if not MSRC.is_dir():
        pytest.skip(f"MSRC-v2 not found at {MSRC}")
    from PIL import Image
    imgs, labels = [], []
    for name in IMAGES:
        img = np.asarray(Image.open(MSRC / "images" / f"{name}.png").convert("RGB").resize((SIZE, SIZE)))
        lab = Image.open(MSRC / "labels" / f"{name}.png").resize((SIZE, SIZE), Image.NEAREST)
        lab = np.asarray(lab).astype(np.int64)
        imgs.append(torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255)
        labels.append(torch.from_numpy(np.where(lab == 0, 255, lab)))
    torch.manual_seed(123)
    net = nn.Sequential(*[m for i in range(3) for m in (nn.Conv2d(3 if i == 0 else 32, 32, 3, 2, 1), nn.ReLU())])
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    with torch.no_grad():
        feats = net((torch.stack(imgs) - mean) / std)
    return feats, torch.stack(labels)


def fg_masks(labels):
    """PFENet's support mask for each image's most frequent class: (label == class), 255 -> 0."""
    masks = []
    for lab in labels:
        ids = lab[lab != 255]
        masks.append((lab == ids.mode().values).float())
    return torch.stack(masks)


def random_mask(*shape, p=0.4):
    return (torch.rand(shape) < p).float()


# ---- PFENet / BAM -------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["random", "real"])
def test_weighted_gap(source, real):
    if source == "random":
        feats, mask = torch.randn(3, 16, 9, 9), random_mask(3, 1, 9, 9)
    else:
        feats = real[0]
        mask = F.interpolate(fg_masks(real[1])[:, None], size=(9, 9), mode="bilinear", align_corners=True)
    check(pfenet.Weighted_GAP, T.weighted_gap, feats, mask)
    assert pfenet.Weighted_GAP(feats, mask).shape == (feats.shape[0], feats.shape[1], 1, 1)


def test_kshot_in_place_sums_backpropagate():
    """PFENet's k-shot code (and CyCTR's, UMTFSS's) adds into Weighted_GAP's result in place; PANet's or
    POPNet's callers may do the same with theirs: backward works and gives the out-of-place sum's gradients
    (a view of the op's output, which the op saves for backward, made this raise)."""
    feats = torch.randn(3, 2, 8, 7, 7, dtype=torch.float64)
    masks = random_mask(3, 2, 7, 7).double()
    labels = torch.randint(0, 4, (3, 2, 1, 7, 7)).double()
    calls = [(pfenet.Weighted_GAP, lambda k: (masks[:, k:k + 1],)), (panet.getFeatures, lambda k: (masks[:, k],)),
             (popnet.class_average_features, lambda k: (labels[:, k], 4))]
    for fn, args in calls:
        grads = []
        for in_place in (True, False):
            f = feats.clone().requires_grad_()
            total = fn(f[:, 0], *args(0))
            if in_place:
                total += fn(f[:, 1], *args(1))  # PFENet: supp_feat += supp_feat_list[i]
                total /= 2
            else:
                total = (total + fn(f[:, 1], *args(1))) / 2
            total.pow(2).sum().backward()
            grads.append(f.grad)
        close(grads[0], grads[1])


def test_weighted_gap_empty_mask_and_bad_shape():
    feats = torch.randn(2, 8, 5, 5)
    close(pfenet.Weighted_GAP(feats, torch.zeros(2, 1, 5, 5)), torch.zeros(2, 8, 1, 1))
    with pytest.raises(ValueError, match="mask must be"):
        pfenet.Weighted_GAP(feats, torch.zeros(2, 5, 5))


@pytest.mark.parametrize("shots", [1, 3])
@pytest.mark.parametrize("resize", [9, 17])
def test_corr_query_mask_pfenet(shots, resize):
    query = torch.randn(2, 24, 9, 9).relu().double()
    supports = [torch.randn(2, 24, 9, 9).relu().double() for _ in range(shots)]
    labels = torch.randint(0, 3, (shots, 2, SIZE, SIZE))
    labels[..., :5, :] = 255  # padding: PFENet's (s_y == 1) makes it background
    masks = [(lab == 1).double().unsqueeze(1) for lab in labels]
    ours = lambda q, *s: pfenet.corr_query_mask(q, list(s), masks, (resize, resize))  # noqa: E731
    theirs = lambda q, *s: T.pfenet_prior(q, list(s), masks, (resize, resize))  # noqa: E731
    check(ours, theirs, query, *supports, rtol=1e-10, atol=1e-12)


def test_corr_query_mask_real(real):
    feats, labels = real
    masks = fg_masks(labels)[:, None]
    query = feats[:2]
    supports = [feats[2:], feats[[1, 0]]]  # two shots, batch of 2
    mask_list = [masks[2:], masks[[1, 0]]]
    ours = lambda q, *s: pfenet.corr_query_mask(q, list(s), mask_list, 9)  # noqa: E731
    theirs = lambda q, *s: T.pfenet_prior(q, list(s), mask_list, (9, 9))  # noqa: E731
    check(ours, theirs, query, *supports)


def test_corr_query_mask_bam_weights():
    shots = 3
    query = torch.randn(2, 16, 9, 9).relu()
    supports = [torch.randn(2, 16, 9, 9).relu() for _ in range(shots)]
    masks = [random_mask(2, 1, SIZE, SIZE) for _ in range(shots)]
    weight_soft = torch.randn(2, shots, 1, 1).softmax(1)
    ours = pfenet.corr_query_mask(query, supports, masks, (9, 9), weight_soft=weight_soft)
    close(ours, T.pfenet_prior(query, supports, masks, (9, 9), weight_soft=weight_soft))
    # BAM's 1-shot weight is 1: the same as PFENet's mean
    one = pfenet.corr_query_mask(query, supports[:1], masks[:1], 9, weight_soft=torch.ones(2, 1, 1, 1))
    close(one, T.pfenet_prior(query, supports[:1], masks[:1], (9, 9)))


def test_corr_query_mask_needs_one_mask_per_shot():
    with pytest.raises(ValueError, match="one mask per support map"):
        pfenet.corr_query_mask(torch.randn(1, 4, 5, 5), [torch.randn(1, 4, 5, 5)], [], 5)


# ---- PANet --------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["random", "tiny", "real"])
def test_get_features(source, real):
    if source == "random":
        fts, mask = torch.randn(1, 16, 9, 9), random_mask(1, 41, 41)
    elif source == "tiny":  # an area of 0.002: PANet's 1e-5 shows; gradients of 1 / area size, so fp64
        fts, mask = torch.randn(1, 16, 9, 9).double(), torch.zeros(1, 41, 41).double()
        mask[0, 20, 20:22] = 0.001
        return check(panet.getFeatures, T.get_features, fts, mask, rtol=1e-10, atol=1e-10)
    else:
        fts, mask = real[0][:1], fg_masks(real[1][:1])
    check(panet.getFeatures, T.get_features, fts, mask)


def test_get_features_batch_pools_each_image(real):
    fts, masks = real[0], fg_masks(real[1])
    batched = panet.getFeatures(fts, masks)
    close(batched, torch.cat([T.get_features(fts[[i]], masks[[i]]) for i in range(len(fts))]))


def test_get_prototype_identical():
    fg = [[torch.randn(1, 8) for _ in range(3)] for _ in range(2)]
    bg = [[torch.randn(1, 8) for _ in range(3)] for _ in range(2)]
    ours, theirs = panet.getPrototype(fg, bg), T.get_prototype(fg, bg)
    for a, b in zip(ours[0] + [ours[1]], theirs[0] + [theirs[1]]):
        assert torch.equal(a, b)


# calDist multiplies the cosine by 20, so fp32 rounding of the cosine shows 20 times larger
SCALED = dict(rtol=1e-5, atol=20 * 1e-5)


@pytest.mark.parametrize("batch", [1, 2])
def test_cal_dist(batch, real):
    check(panet.calDist, T.cal_dist, torch.randn(batch, 16, 9, 9), torch.randn(batch, 16), **SCALED)
    check(panet.calDist, T.cal_dist, real[0], real[0].mean((2, 3))[:1], **SCALED)
    close(panet.calDist(real[0], torch.zeros(1, 32)), T.cal_dist(real[0], torch.zeros(1, 32)))
    check(panet.calDist, T.cal_dist, torch.randn(batch, 16, 9, 9), torch.randn(16), **SCALED)  # (C,) broadcasts


def test_cal_dist_half_and_autocast():
    """Ordinary fp16 features overflow a dot / (|f| |p|) computed in fp16 (NaN); torch's cosine does not.
    Under autocast cosine_similarity runs in fp32, and so does ours."""
    fts, proto = torch.rand(1, 512, 5, 5) * 40, torch.rand(1, 512) * 40
    exact = T.cal_dist(fts, proto)
    for dtype in (torch.float16, torch.bfloat16):
        ours = panet.calDist(fts.to(dtype), proto.to(dtype))
        assert ours.dtype == dtype
        close(ours.float(), exact, rtol=1e-2, atol=0.1)
        close(ours, T.cal_dist(fts.to(dtype), proto.to(dtype)), rtol=1e-2, atol=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = panet.calDist(fts, proto), T.cal_dist(fts, proto)
    assert ours.dtype == theirs.dtype == torch.float32
    close(ours, theirs, **SCALED)


def test_corr_query_mask_keeps_the_features_dtype():
    """A half PFENet concatenates the prior with its half features: a float32 prior would promote them."""
    query, support = torch.randn(2, 16, 9, 9).relu(), torch.randn(2, 16, 9, 9).relu()
    mask = random_mask(2, 1, SIZE, SIZE)
    exact = T.pfenet_prior(query, [support], [mask], (9, 9))
    for dtype in (torch.float16, torch.bfloat16):
        ours = pfenet.corr_query_mask(query.to(dtype), [support.to(dtype)], [mask.to(dtype)], 9)
        assert ours.dtype == dtype
        close(ours.float(), exact, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("queries,ways,shots", [(1, 1, 1), (1, 2, 2), (2, 2, 1)])
def test_align_loss(queries, ways, shots):
    C, h, H = 16, 9, 33
    qry, supp = torch.randn(queries, C, h, h), torch.randn(ways, shots, C, h, h)
    pred = torch.randn(queries, 1 + ways, h, h)
    pred[:, -1] -= 10 if ways > 1 else 0  # the last way never wins: skipped, as PANet skips it
    fore = random_mask(ways, shots, H, H)
    back = (1 - fore) * random_mask(ways, shots, H, H, p=0.8)  # some pixels in neither: label 255
    ours = lambda q, s: panet.alignLoss(q, pred, s, fore, back)  # noqa: E731
    theirs = lambda q, s: T.align_loss(q, pred, s, fore, back)  # noqa: E731
    check(ours, theirs, qry, supp, **SCALED)


def test_align_loss_of_half_features():
    """PANet's float mask makes its query prototypes, scores and loss float32: with fp16 features of ordinary size
    the fused loss used to be inf (the fp16 cross-entropy's sum over the mask) or NaN (two queries' fp16 sums)."""
    g = torch.Generator().manual_seed(0)
    qry, supp = torch.rand(2, 64, 53, 53, generator=g) * 60, torch.rand(1, 1, 64, 53, 53, generator=g) * 60
    pred = torch.zeros(2, 2, 53, 53)
    pred[:, 1] = 1  # every query pixel foreground
    fore = random_mask(1, 1, 100, 100)
    want = T.align_loss(qry.half(), pred, supp.half(), fore, 1 - fore)
    got = panet.alignLoss(qry.half(), pred, supp.half(), fore, 1 - fore)
    assert got.dtype == want.dtype == torch.float32 and torch.isfinite(want)
    close(got, want, rtol=1e-4, atol=1e-4)


def test_panet_patch():
    class FewShotSeg(nn.Module):
        pass
    model = FewShotSeg()
    panet.patch(model)
    assert model.getFeatures is panet.getFeatures and model.alignLoss is panet.alignLoss
    assert model.calDist(torch.ones(1, 2, 3, 3), torch.ones(1, 2)).shape == (1, 3, 3)


# ---- POPNet / EOPNet ----------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["random", "real"])
def test_class_average_features(source, real):
    nclasses = 7
    if source == "random":
        feats = torch.randn(2, 16, 9, 9)
        labels = torch.randint(0, 9, (2, 1, SIZE, SIZE)).float()  # ids 7, 8 are outside: no class
        labels[:, :, :4] = 255
    else:
        feats, labels = real[0], real[1][:, None].float().clamp(max=nclasses + 1)
        labels[real[1][:, None] == 255] = 255
    ours = lambda f: popnet.class_average_features(f, labels, nclasses)  # noqa: E731
    theirs = lambda f: T.popnet_sp_ave_features(f, labels, nclasses)  # noqa: E731
    check(ours, theirs, feats)


@pytest.mark.parametrize("plobs", [True, False])
def test_get_static_prototypes(plobs, real):
    feats = real[0]
    labels = F.interpolate(real[1][:, None].float(), size=(9, 9), mode="nearest")[:, 0].clamp(max=5)
    mask = F.one_hot(labels.long().clamp(max=4), 5).permute(0, 3, 1, 2).float() + 0.1 * torch.rand(4, 5, 9, 9) \
        if plobs else labels
    ours = lambda f: popnet.get_static_prototypes(mask, f, 5, plobs)  # noqa: E731
    theirs = lambda f: T.eopnet_static_prototypes(mask, f, 5, plobs)  # noqa: E731
    check(ours, theirs, feats)
    with pytest.raises(ValueError, match="feature grid"):
        popnet.get_static_prototypes(torch.zeros(4, 5, 5), feats, 5, plobs=False)


# ---- UMTFSS -------------------------------------------------------------------------------------

def _replay_draws(seed, parts, C, clusters):
    """The draws cluster_group_lsh_kmeans makes from a generator, in its documented order."""
    g = torch.Generator().manual_seed(seed)
    planes = [ops.lsh_planes(32, C, generator=g) for _ in parts]
    inits = [ops.draw_init(part, k, g) for part, k in zip(parts, clusters)]
    return planes, inits


@pytest.mark.parametrize("use_valid", [False, True])
@pytest.mark.parametrize("source", ["random", "real"])
def test_cluster_group_lsh_kmeans(use_valid, source, real):
    clusters = (5, 8)
    if source == "random":
        B, L, C = 3, 120, 16
        s_x = torch.randn(B, L, C)
        fg = torch.rand(B, L) < 0.3
        fg[1] = False
        fg[1, :4] = True  # image 1: fewer foreground tokens than clusters -> raw tokens
    else:
        s_x = real[0].flatten(2).transpose(1, 2).contiguous()  # (4, 81, 32)
        B, L, C = s_x.shape
        fg = F.interpolate(fg_masks(real[1])[:, None], size=(9, 9), mode="nearest").flatten(1).bool()
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[0, -20:] = True
    parts = [fg, ~fg] if use_valid else [fg & ~pad, ~fg & ~pad]
    planes, inits = _replay_draws(7, parts, C, clusters)
    ours = lambda x: umtfss.cluster_group_lsh_kmeans(  # noqa: E731
        x, pad, fg, use_valid, clusters_fg=5, clusters_bg=8, n_iter=4, generator=torch.Generator().manual_seed(7))[0]
    theirs = lambda x: T.cluster_group_lsh_kmeans(x, pad, fg, planes, inits, clusters, 4, use_valid)[0]  # noqa: E731
    check(ours, theirs, s_x)
    _, mask = umtfss.cluster_group_lsh_kmeans(s_x, pad, fg, use_valid, clusters_fg=5, clusters_bg=8, n_iter=4,
                                              generator=torch.Generator().manual_seed(7))
    close(mask, T.cluster_group_lsh_kmeans(s_x, pad, fg, planes, inits, clusters, 4, use_valid)[1])


def test_cluster_group_one_cluster_is_the_mean():
    s_x, fg = torch.randn(2, 30, 8), torch.rand(2, 30) < 0.5
    pad = torch.zeros(2, 30, dtype=torch.bool)
    protos, mask = umtfss.cluster_group_lsh_kmeans(s_x, pad, fg, clusters_fg=1, clusters_bg=1)
    close(protos[:, 0], torch.stack([s_x[b][fg[b]].mean(0) for b in range(2)]))
    close(protos[:, 1], torch.stack([s_x[b][~fg[b]].mean(0) for b in range(2)]))
    assert mask.eq(0).all()


def test_cluster_module_is_seeded():
    x = torch.randn(200, 16)
    a, counts = umtfss.Cluster(10, generator=torch.Generator().manual_seed(3))(x, 12)
    b, _ = umtfss.Cluster(10, generator=torch.Generator().manual_seed(3))(x, 12)
    assert torch.equal(a, b) and a.dtype == torch.int64 and counts.dtype == torch.int32
    assert int(counts.sum()) == 200 and torch.equal(torch.bincount(a, minlength=12).int(), counts)
    with pytest.raises(ValueError, match="down_dim"):
        umtfss.Cluster(10, down_dim=32)


def _attention_pair(qkv_bias=False, heads=8, dim=64):
    theirs = T.ProtoCrossAtt(dim, num_heads=heads, qkv_bias=qkv_bias, attn_drop=0.1, proj_drop=0.1).eval()
    ours = umtfss.ProtoCrossAtt(dim, num_heads=heads, qkv_bias=qkv_bias, attn_drop=0.1, proj_drop=0.1).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: the public parameter names load unchanged
    return ours, theirs


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_proto_cross_att_state_dict_and_output(qkv_bias, real):
    ours, theirs = _attention_pair(qkv_bias, heads=4, dim=32)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    q = real[0][:2].flatten(2).transpose(1, 2)  # (2, 81, 32) real-image tokens
    k = F.normalize(torch.randn(2, 70, 32), dim=-1)
    padding = torch.zeros(2, 70)
    padding[0, 25:] = 1
    padding[1, :] = 1  # every prototype padding: UMTFSS's shifted scores are a plain softmax
    out, g = grads(lambda q, k: ours(q, k, k, padding[:1]), q[:1], k[:1])
    ref, g_ref = grads(lambda q, k: theirs(q, k, k, padding[:1]), q[:1], k[:1])
    close(out, ref)
    for a, b in zip(g, g_ref):
        close(a, b)
    # the all-padding image: UMTFSS's -10000 shift rounds the scores in fp32, so 1e-3 there
    close(ours(q, k, k, padding), theirs(q, k, k, padding), rtol=1e-3, atol=1e-3)
    close(ours(q, k, k), theirs(q, k, k))


def test_proto_cross_att_training_without_dropout_and_bad_mask():
    ours, theirs = _attention_pair()
    ours.attn_drop.p = theirs.attn_drop.p = 0.0
    ours.proj_drop.p = theirs.proj_drop.p = 0.0
    ours.train(), theirs.train()
    x, k = torch.randn(2, 50, 64), torch.randn(2, 70, 64)
    close(ours(x, k, k), theirs(x, k, k))
    with pytest.raises(ValueError, match="only 0 and 1"):
        ours(x, k, k, torch.full((2, 70), 0.5))


def test_umtfss_patch():
    class Supp(nn.Module):
        clusters_fg, clusters_bg, n_iter = 4, 6, 3
    transformer = nn.Module()
    theirs = T.ProtoCrossAtt(32, num_heads=8, attn_drop=0.1, proj_drop=0.1).eval()
    transformer.cross_layers = nn.ModuleList([theirs])
    transformer.self_supp_cluster = Supp()
    before = list(transformer.parameters())
    optimizer = torch.optim.SGD(transformer.parameters(), lr=0.1)  # built before the patch, as a training script may
    umtfss.patch(transformer, generator=torch.Generator().manual_seed(0))
    layer = transformer.cross_layers[0]
    assert isinstance(layer, umtfss.ProtoCrossAtt) and not layer.training and layer.attn_drop.p == 0.1
    assert all(a is b for a, b in zip(before, transformer.parameters())) and len(before) == 4
    x, k = torch.randn(1, 20, 32), torch.randn(1, 10, 32)
    close(layer(x, k, k), theirs(x, k, k))
    layer(x, k, k).sum().backward()
    weight = layer.q_fc.weight.detach().clone()
    optimizer.step()  # the optimizer still trains the patched layer
    assert not torch.equal(layer.q_fc.weight, weight)
    protos, mask = transformer.self_supp_cluster.cluster_group_lsh_kmeans(
        torch.randn(1, 50, 32), torch.zeros(1, 50, dtype=torch.bool), torch.rand(1, 50) < 0.5)
    assert protos.shape == (1, 10, 32) and mask.sum() == 0
    # a model in another dtype keeps it: the swapped layer runs on its inputs
    doubled = nn.Module()
    theirs64 = T.ProtoCrossAtt(32, num_heads=8).double().eval()
    doubled.cross_layers, doubled.self_supp_cluster = nn.ModuleList([theirs64]), Supp()
    umtfss.patch(doubled)
    x64, k64 = x.double(), k.double()
    assert doubled.cross_layers[0].q_fc.weight.dtype == torch.float64
    close(doubled.cross_layers[0](x64, k64, k64), theirs64(x64, k64, k64))


def test_review_fixes_fractional_labels_half_tokens_and_all_padding():
    # POPNet's mask2map compares exactly: a fractional label (bilinear resize) is in no class; .long() had
    # truncated -0.5 into class 0 and 2.5 into class 2
    feats, labels = torch.randn(1, 4, 6, 6), torch.randint(0, 3, (1, 1, 6, 6)).float()
    labels[..., :2, :] = 2.5
    labels[..., 2, :] = -0.5
    check(lambda f: popnet.class_average_features(f, labels, 3),
          lambda f: T.popnet_sp_ave_features(f, labels, 3), feats)
    # a half model's tokens: the planes lsh_hash needs are float32 (the compat drew them in the tokens' dtype)
    assign, counts = umtfss.Cluster(10, generator=torch.Generator().manual_seed(0))(torch.randn(50, 8).half(), 4)
    assert int(counts.sum()) == 50
    # every prototype invalid: UMTFSS's -10000 on every score is a plain softmax; the nn layer gave zeros
    from fsskern.nn import PrototypeCrossAttention
    layer = PrototypeCrossAttention(16, heads=2).eval()
    x, protos = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    none = torch.zeros(2, 3, dtype=torch.bool)
    close(layer(x, protos, none), layer(x, protos, ~none))
