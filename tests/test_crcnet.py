"""CRCNet (fsskern.models.crcnet): the method contract on CPU at small sizes, plus the notes' acceptance
checks 8.2 (no label leak with support_condition="cross", the refinement cache, k-shot fine-tuning restores
every weight)."""
import sys
from pathlib import Path

import pytest
import torch

from fsskern.engine.config import ModelConfig
from fsskern.models import create_model

sys.path.insert(0, str(Path(__file__).parent))
from method_support import MSRC, assert_refuses_label_maps, fit_until, msrc_episodes  # noqa: E402



def build(ops="fused", backbone="mobilenet_v2", weights=None, seed=0, **params):
    torch.manual_seed(seed)
    return create_model(ModelConfig(name="crcnet", backbone=backbone, weights=weights, params=params), ops=ops)


def episode(B=2, K=1, H=65, seed=1):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(B, K, H, H, dtype=torch.long)
    masks[..., H // 4:H // 2 + 8, H // 5:H // 2 + 4] = 1
    masks[..., :3, :] = 255
    qmask = torch.zeros(B, H, H, dtype=torch.long)
    qmask[:, H // 3:, H // 2:] = 1
    return dict(query_img=torch.randn(B, 3, H, H, generator=g), support_imgs=torch.randn(B, K, 3, H, H, generator=g),
                support_masks=masks, query_mask=qmask, classes=torch.ones(B, 1, dtype=torch.long))


def test_params_are_validated():
    with pytest.raises(ValueError, match="unknown model.params key.*local_mod; valid keys"):
        build(local_mod="exclude")
    with pytest.raises(ValueError, match="local_mode must be one of"):
        build(local_mode="mask")
    for bad in (dict(cache_channels=True), dict(cr_fc_layers=True), dict(cache_channels=2.0)):  # True == 1, 2.0 == 2
        with pytest.raises(ValueError, match="must be one of"):
            build(**bad)
    with pytest.raises(ValueError, match="scales must be a non-empty list of positive numbers"):
        build(scales=[True])
    with pytest.raises(ValueError, match="nothing to predict from"):
        build(cross_reference=False, global_condition=False, local_condition=False)


@pytest.mark.parametrize("mode", ["multiply", "exclude"])
def test_fused_matches_reference(mode):
    """Outputs, losses and gradients of the real model (train mode, same refinement-step draw) with ops=fused vs
    ops=reference, in float64: rtol 1e-6, atol 1e-9 (measured: 1e-10 of the largest gradient). In float32 the
    outputs agree to 1e-5 but summed bias gradients only to ~4e-3 relative (unscaled attention logits and
    the refinement loop amplify the ops' 1e-6 rounding differences), so float64 is what shows equality."""
    batch = {k: v.double() if v.is_floating_point() else v for k, v in episode().items()}
    results = []
    for ops in ("fused", "reference"):
        model = build(ops=ops, local_mode=mode).train().double()
        torch.manual_seed(3)
        out = model(batch)
        sum(out["losses"].values()).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (fo, fg), (ro, rg) = results
    tol = dict(rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(fo["logits"], ro["logits"], **tol)
    assert set(fo["losses"]) == {"qm", "sm", "qm_sub", "sm_sub"}
    for key in fo["losses"]:
        torch.testing.assert_close(fo["losses"][key], ro["losses"][key], **tol)
    assert fg.keys() == rg.keys() and len(fg) > 20
    for key in fg:
        assert fg[key] is not None, key
        torch.testing.assert_close(fg[key], rg[key], **tol, msg=key)
    assert fg["theta.0.weight"].abs().sum() > 0 and fg["gc_fuse.0.weight"].abs().sum() > 0


def test_no_label_leak_and_cache():
    """cross conditioning: SM ignores M_s and QM ignores M_q (notes 8.2 #3); the cache starts at zero and a
    step count of 1 is one pass without it (8.2 #4)."""
    model = build().eval()
    fs, fq = torch.randn(2, 256, 9, 9), torch.randn(2, 256, 9, 9)
    ms, mq = (torch.rand(2, 65, 65) > 0.5).float(), (torch.rand(2, 65, 65) > 0.5).float()
    with torch.no_grad():
        a = model.pair(fs, fq, ms, mq, steps=3)
        b = model.pair(fs, fq, 1 - ms, mq, steps=3)
        c = model.pair(fs, fq, ms, 1 - mq, steps=3)
        torch.testing.assert_close(a["sm"], b["sm"])
        torch.testing.assert_close(a["qm"], c["qm"])
        assert not torch.allclose(a["qm"], b["qm"]) and not torch.allclose(a["sm"], c["sm"])
        x = torch.randn(2, 768, 9, 9)
        x0 = model.mr_in(x)
        feat = torch.cat([x0, model.mr_gcn(x0)], 1)
        first = model.mr_cls(model.mr_combine(torch.cat([feat, torch.zeros(2, 2, 9, 9)], 1)))
        torch.testing.assert_close(model.refine(x, 1), first)
        second = model.mr_cls(model.mr_combine(torch.cat([feat, first.softmax(1)], 1)))
        torch.testing.assert_close(model.refine(x, 2), second)
    assert build(mask_refine=False).mr_combine[0][0].in_channels == 512


def test_refinement_steps_grad_and_eq5_weight():
    """Training runs the steps before the drawn T without grad (notes 8.2 #4: only the last step trains), a test
    forward runs refine_steps_test steps, and Eq. 5 weighs the sub-head's terms by lambda (8.2 #6)."""
    grad_on, losses = [], []
    for lam in (0.25, 0.1):
        model = build(dim=16, refine_steps_test=5, lambda_sub=lam)
        model.mr_cls.register_forward_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
        model._train_steps = lambda: 3
        torch.manual_seed(5)  # the same dropout draws for both weights
        losses.append(model.train()(episode())["losses"])
    assert grad_on == [False, False, True] * 2
    a, b = losses
    for key in ("qm", "sm"):
        torch.testing.assert_close(a[key], b[key])
    for key in ("qm_sub", "sm_sub"):
        torch.testing.assert_close(a[key] / 0.25, b[key] / 0.1)
    grad_on.clear()
    batch = episode()
    with torch.no_grad():
        model.eval()(batch)
    assert grad_on == [False] * 5


@pytest.mark.parametrize("cache_channels", [1, 2])
def test_refine_convolves_the_constant_input_once_with_the_same_result(cache_channels):
    """refine splits the first combine conv by input channel (the 2 x dim constant ones convolved once, the cache's
    per step); with 1 or 2 cache channels it equals the paper's loop on the concatenation, cache last."""
    model = build(dim=16, cache_channels=cache_channels).eval()
    x = torch.randn(2, 48, 7, 7)
    with torch.no_grad():
        x0 = model.mr_in(x)
        feat = torch.cat([x0, model.mr_gcn(x0)], 1)
        cache = torch.zeros(2, cache_channels, 7, 7)
        for step in range(1, 5):
            logits = model.mr_cls(model.mr_combine(torch.cat([feat, cache], 1)))
            torch.testing.assert_close(model.refine(x, step), logits)
            cache = logits.softmax(1)[:, 2 - cache_channels:]


@pytest.mark.parametrize("shots", [1, 3])
def test_kshot_training_and_fusion(shots):
    model = build().train()
    batch = episode(K=shots)
    out = model(batch)
    assert out["logits"].shape == (2, 2, 65, 65)
    sum(out["losses"].values()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.reduce[0].weight.grad.abs().sum() > 0
    with torch.no_grad():
        fused = model.eval()(batch)["logits"].exp()
        shots_alone = [model(dict(batch, support_imgs=batch["support_imgs"][:, k:k + 1],
                                  support_masks=batch["support_masks"][:, k:k + 1]))["logits"].exp()
                       for k in range(shots)]
    torch.testing.assert_close(fused, sum(shots_alone) / shots, rtol=1e-5, atol=1e-6)  # fusion = mean of shots


def test_kshot_finetune_restores_every_weight():
    """Weights and gradients: a validation inside training must leave the next step only its own gradient (the
    fine-tuning's last one once stayed on every tuned weight)."""
    model = build(kshot="finetune+fusion", ft_steps=3, scales=[0.75, 1.0]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.mr_cls.weight.grad = torch.ones_like(model.mr_cls.weight)  # a training step's, mid-accumulation
    batch = episode(K=2, B=1)
    with torch.no_grad():
        out = model(batch)["logits"]
    assert out.shape == (1, 2, 65, 65) and torch.isfinite(out).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert list(grads) == ["mr_cls.weight"]
    assert torch.equal(grads["mr_cls.weight"], torch.ones_like(model.mr_cls.weight))
    assert not model.training
    with pytest.raises(ValueError, match="needs >= 2 support images"):
        model(episode(K=1))


def test_kshot_finetune_draws_from_the_episode_not_the_global_rng():
    """Pairs, flips, refinement steps and dropout come from ft_seed + the episode's index under a forked RNG: the
    same episode scores the same whatever ran before it (another rank, another order), and the caller's random
    stream (a validation inside training) is left where it was."""
    model = build(kshot="finetune+fusion", dim=32, ft_steps=3, ft_lr=0.5).eval()
    batch = dict(episode(K=2, B=1), index=torch.tensor([7]))
    outs = []
    with torch.no_grad():
        for seed in (1, 2):
            torch.manual_seed(seed)
            outs.append(model(batch)["logits"])
            after = torch.rand(4)
            torch.manual_seed(seed)
            assert torch.equal(after, torch.rand(4))  # the fine-tuning drew nothing from the global stream
        others = [model(dict(batch, index=torch.tensor([i])))["logits"] for i in (8, 9, 10)]
    assert torch.equal(outs[0], outs[1])
    assert any(not torch.equal(outs[0], o) for o in others)


def test_kshot_finetune_tunes_under_autocast():
    """The evaluator runs a batch under one autocast region (amp=bf16/fp16), which casts each weight once and
    reuses the copy: the fine-tuning must still change the prediction, as it does in float32."""
    batch = episode(K=2, B=1)
    for amp in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp), torch.no_grad():
            plain = build(kshot="fusion", dim=32).eval()(batch)["logits"].float()
            tuned = build(kshot="finetune+fusion", dim=32, ft_steps=3, ft_lr=0.5).eval()(batch)["logits"].float()
        assert (tuned - plain).abs().max() > 0.1, amp


def test_encoder_one_image_per_call_changes_nothing_but_the_peak():
    """The frozen encoder runs one image per backbone call: its features (and the reduction conv's gradient) match
    one call on all images, in order; a trained backbone runs once on all of them."""
    x = torch.randn(5, 3, 65, 65, generator=torch.Generator().manual_seed(0))
    for frozen in (True, False):
        model = build().train()
        model.frozen_backbone = frozen
        calls = []
        model.backbone.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
        feats = model.encode(x)
        feats.square().sum().backward()
        assert calls == ([1] * 5 if frozen else [5])
        grad = model.reduce[0].weight.grad.clone()
        model.zero_grad()
        with torch.set_grad_enabled(not frozen):
            out = model.backbone(x, layers=("layer3", "layer4"))
        whole = model.reduce(torch.cat([out["layer3"], out["layer4"]], 1))
        whole.square().sum().backward()
        torch.testing.assert_close(feats, whole, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, model.reduce[0].weight.grad, rtol=1e-5, atol=1e-8)


def test_same_seed_same_result():
    runs = []
    for _ in range(2):
        model = build().train()
        torch.manual_seed(5)
        out = model(episode(K=2))
        sum(out["losses"].values()).backward()
        runs.append((out["logits"], model.mr_in[0].weight.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_bad_inputs():
    model = build().train()
    batch = episode(K=2)
    with pytest.raises(ValueError, match="support_masks .* do not match"):
        model(dict(batch, support_masks=batch["support_masks"][:, :1]))
    with pytest.raises(ValueError, match="support_masks .* do not match"):
        model(dict(batch, support_masks=batch["support_masks"][..., :-1]))
    with pytest.raises(ValueError, match="training needs query_mask"):
        model(dict(batch, query_mask=batch["query_mask"][:, :-1]))
    with pytest.raises(ValueError, match="no support image"):
        model(dict(batch, support_imgs=batch["support_imgs"][:, :0], support_masks=batch["support_masks"][:, :0]))
    assert_refuses_label_maps(model, batch)
    with pytest.raises(ValueError, match="1-way"):
        model(dict(batch, classes=torch.ones(2, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="expected query_img"):
        model(dict(batch, query_img=batch["query_img"][0]))
    with pytest.raises(ValueError, match="share one size"):
        model(dict(batch, support_imgs=batch["support_imgs"][..., :-2, :-2],
                   support_masks=batch["support_masks"][..., :-2, :-2]))
    # A support without foreground is defined (multiply: a uniform local average; the global vector is 0).
    empty = dict(batch, support_masks=torch.zeros_like(batch["support_masks"]))
    assert torch.isfinite(model.eval()(empty)["logits"]).all()


@pytest.mark.skipif(not (MSRC / "images").is_dir(), reason=f"MSRC-v2 not found at {MSRC}")
def test_overfits_real_msrc_episodes():
    """Two real episodes (MobileNetV2 ImageNet weights, frozen; 64-wide modules to keep it cheap) are fitted to
    query foreground IoU >= 0.9 (pooled over both episodes) at test time (10 refinement steps); ~140 steps."""
    model = build(weights="imagenet", dim=64)
    iou, steps = fit_until(model, msrc_episodes(), lr=3e-3, steps=180, every=20)
    assert iou >= 0.9, f"query foreground IoU {iou:.3f} after {steps} steps"


@pytest.mark.slow
def test_paper_size_forward_backward():
    """ResNet-50 (torchvision stem and dilation, output stride 8) at 321 x 321, 1-shot, batch 1, once:
    41 x 41 features, shapes and finite gradients."""
    model = build(backbone="resnet50").train()
    batch = episode(B=1, H=321)
    assert model.encode(batch["query_img"]).shape == (1, 256, 41, 41)
    out = model(batch)
    assert out["logits"].shape == (1, 2, 321, 321)
    sum(out["losses"].values()).backward()
    assert model.reduce[0].weight.grad.shape == (256, 3072, 3, 3)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
