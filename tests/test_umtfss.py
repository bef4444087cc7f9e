"""UMTFSS (fsskern.models.umtfss): the method contract on CPU at small sizes."""
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import load_script
from fsskern import ops

from fsskern.engine.config import ModelConfig, TrainConfig
from fsskern.engine.optim import build_optimizers, build_schedulers, lr_factor
from fsskern.models import create_model
from fsskern.models.umtfss import _attention_rows, dense_attention, dice_loss, dropout_keep_mask, sine_encoding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from method_support import MSRC, OpInputDtypes, assert_refuses_label_maps, fit_until, msrc_episodes  # noqa: E402

SMALL = dict(reduce_dim=32, heads=4, k_fg=5, k_bg=10)


def build(ops="fused", backbone="mobilenet_v2", weights=None, seed=0, **params):
    torch.manual_seed(seed)
    return create_model(ModelConfig(name="umtfss", backbone=backbone, weights=weights, params={**SMALL, **params}),
                        ops=ops)


def episode(B=2, K=1, H=65, seed=1):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(B, K, H, H, dtype=torch.long)
    masks[..., H // 4:H // 2 + 8, H // 5:H // 2 + 4] = 1
    masks[..., -9:, :] = 255  # padding at the bottom, as the test resize leaves it
    qmask = torch.zeros(B, H, H, dtype=torch.long)
    qmask[:, H // 3:, H // 2:] = 1
    return dict(query_img=torch.randn(B, 3, H, H, generator=g), support_imgs=torch.randn(B, K, 3, H, H, generator=g),
                support_masks=masks, query_mask=qmask, classes=torch.ones(B, 1, dtype=torch.long),
                index=torch.arange(B) + 7)


def test_params_profiles_and_groups():
    assert build(k_fg=None, k_bg=None).p["k_fg"] == 50 and build(k_fg=None, k_bg=None).p["k_bg"] == 100
    code = build(profile="code", k_fg=None, k_bg=None)
    assert (code.p["k_fg"], code.p["k_bg"], len(code.transformer["support"])) == (20, 50, 0)
    with pytest.raises(ValueError, match="unknown model.params key.*kfg; valid keys"):
        build(kfg=3)
    with pytest.raises(ValueError, match="profile must be one of paper, code"):
        build(profile="fast")
    with pytest.raises(ValueError, match="dropout must be in"):
        build(dropout=1.0)
    with pytest.raises(ValueError, match="heads must be int"):
        build(heads="8")
    with pytest.raises(ValueError, match="divisible by heads"):
        build(reduce_dim=30, heads=4)
    with pytest.raises(ValueError, match="backbone is frozen"):
        create_model(ModelConfig(name="umtfss", backbone="mobilenet_v2", freeze_backbone=False))
    # SGD x15 for the convolutions, AdamW (1e-4, decay 1e-2, none on LayerNorm) for the Transformer; one
    # optimizer each through the engine, every trainable parameter in exactly one group, the backbone in none
    model = build()
    sgd, adamw = sorted(build_optimizers(model, TrainConfig(lr=0.01)), key=lambda o: type(o).__name__, reverse=True)
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adamw, torch.optim.AdamW)
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.15)
    assert [(g["lr"], g["weight_decay"]) for g in adamw.param_groups] == [(1e-4, 1e-2), (1e-4, 0.0)]
    grouped = [id(p) for o in (sgd, adamw) for g in o.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    transformer = {id(p) for p in model.transformer.parameters()}
    assert {id(p) for g in adamw.param_groups for p in g["params"]} == transformer
    # the code's schedules: SGD warms up then decays (poly), AdamW keeps its LR
    cfg = TrainConfig(lr=0.01, iters=10, warmup_iters=2, poly_power=0.9)
    sgd, adamw = sorted(build_optimizers(model, cfg), key=lambda o: type(o).__name__, reverse=True)
    schedulers = build_schedulers([sgd, adamw], cfg)
    lrs = []
    for it in range(10):
        lrs.append((sgd.param_groups[0]["lr"], [g["lr"] for g in adamw.param_groups]))
        for o, s in zip((sgd, adamw), schedulers):
            o.step()
            s.step()
    assert [a for a, _ in lrs] == pytest.approx([0.15 * lr_factor(it, cfg) for it in range(10)])
    assert lrs[0][0] == pytest.approx(0.075) and lrs[9][0] < 0.02
    assert all(b == [1e-4, 1e-4] for _, b in lrs)
    bad = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "schedule": "cosine"}], lr=0.1)
    with pytest.raises(ValueError, match="unknown schedule 'cosine'"):
        build_schedulers([bad], cfg)


def test_resnet_dilated_as_the_code():
    """The code's backbone dilates as torchvision's replace_stride_with_dilation: the first block of layer3 and
    layer4 keeps the previous dilation (1, 2), the others take the new one (2, 4); PSPNet's would give 2 and 4
    throughout."""
    model = build(backbone="resnet50_v2", output_stride=8)
    dilations = [[block.conv2.dilation[0] for block in layer] for layer in (model.backbone.layer3,
                                                                           model.backbone.layer4)]
    assert dilations == [[1, 2, 2, 2, 2, 2], [2, 4, 4]]


def test_sine_encoding_and_dice_loss():
    pos = sine_encoding(3, 5, 8)
    assert pos.shape == (15, 8) and torch.equal(pos[0, :4], pos[4, :4])  # y features depend on the row only
    assert torch.allclose(pos[-1, [0, 4]], torch.zeros(2), atol=1e-5)    # sin(2 pi) at the last row / column
    target = torch.tensor([[[0, 1], [255, 1]]])
    perfect = torch.stack([torch.where(target == 0, 30.0, -30.0), torch.where(target == 1, 30.0, -30.0)], 1)
    assert dice_loss(perfect, target) < 1e-6
    assert dice_loss(-perfect, target) == pytest.approx(2.0, abs=1e-6)


def test_lean_dropout_attention_keeps_the_mask_for_backward():
    """The chunked, checkpointed CPU path must give the outputs and gradients of its chunks run without
    checkpointing under the same RNG state: if backward's recomputation drew new masks, the gradients would
    differ. Without dropout its maths is SDPA's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 300, 16, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(2, 1, 1, 300, generator=g) > 0.2

    def by_chunks(q, k, v):
        return torch.cat([_attention_rows(rows, k, v, mask, 0.3) for rows in q.split(64, -2)], -2)

    results = []
    for attend in (lambda q, k, v: dense_attention(q, k, v, mask, dropout_p=0.3, budget=64 * 2 * 4 * 300), by_chunks):
        torch.manual_seed(5)
        out = attend(q, k, v)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for lean, plain in zip(*results):
        torch.testing.assert_close(lean, plain, rtol=0, atol=0)
    with torch.no_grad():
        plain = F.scaled_dot_product_attention(q, k, v, mask)
        assert not torch.allclose(results[0][0], plain)                    # dropout was on
        torch.testing.assert_close(dense_attention(q, k, v, mask), plain)  # and off without it
        torch.testing.assert_close(_attention_rows(q, k, v, mask, 0.0), plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keep_mask_rate(p):
    """Both int16 halves of every draw keep with probability 1 - p (to 2 ** -15), each within 4 sigma: the other
    half's threshold (the halves in the wrong order) would keep about half of the 16-bit half, and none or all of
    the 15-bit one."""
    torch.manual_seed(0)
    keep, keep_p = dropout_keep_mask((5, 400001), p)
    assert keep.dtype == torch.bool and keep.shape == (5, 400001)
    assert abs(keep_p - (1 - p)) <= 2 ** -16
    flat = keep.flatten().float()
    for half in (flat[0::2], flat[1::2]):  # the 16-bit and the 15-bit half of each draw
        assert abs(half.mean().item() - keep_p) < 4 * (keep_p * (1 - keep_p) / half.numel()) ** 0.5
    assert dropout_keep_mask((7,), 0.0)[0].all()


def test_ffn_relu_dropout_is_relu_then_dropout():
    """The FFN's fused ReLU + dropout (only its output kept for backward) gives the outputs and gradients of
    nn.ReLU then nn.Dropout under the same RNG, to the bit, in training and in eval, and the earlier layout's
    weights load into it."""
    from torch import nn
    from fsskern.models.umtfss import FFN
    torch.manual_seed(0)
    ffn = FFN(16, 3, 0.3)
    plain = nn.Sequential(nn.Linear(16, 48, bias=False), nn.ReLU(inplace=True), nn.Dropout(0.3),
                          nn.Linear(48, 16, bias=False), nn.Dropout(0.3))
    ffn.layers.load_state_dict(plain.state_dict())  # checkpoints of the ReLU, Dropout layout still load
    x = torch.randn(4, 50, 16, requires_grad=True)
    outputs = []
    for training in (True, False):
        ffn.train(training), plain.train(training)
        results = []
        for fn in (ffn, lambda x: x + plain(x)):
            torch.manual_seed(3)
            y = fn(x)
            results.append((y, *torch.autograd.grad((y * torch.linspace(-1, 1, 16)).sum(), [x, *ffn.parameters()]
                                                     if fn is ffn else [x, plain[0].weight, plain[3].weight])))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        outputs.append(results[0][0])
    assert not torch.allclose(*outputs)  # dropout was on in training


@pytest.mark.parametrize("shots", [1, 3])
def test_fused_equals_reference(shots):
    """Training mode (Dropout2d draws the same; Transformer dropout 0: the fused attention's dropout is
    counter-based by design): logits, loss and every gradient within rtol 1e-4, atol 1e-5; the same in eval."""
    batch = episode(K=shots)
    results = []
    for ops in ("fused", "reference"):
        model = build(ops, dropout=0.0).train()
        torch.manual_seed(3)
        out = model(batch)
        loss = out["losses"]["dice"]
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        with torch.no_grad():
            results.append((out["logits"], loss, grads, model.eval()(batch)["logits"]))
    (fl, floss, fg, fe), (rl, rloss, rg, re) = results
    torch.testing.assert_close(fl, rl, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(floss, rloss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fe, re, rtol=1e-4, atol=1e-5)
    assert fg.keys() == rg.keys() and len(fg) > 40
    for key in fg:
        torch.testing.assert_close(fg[key], rg[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("profile", ["paper", "code"])
def test_kshot_paths(shots, profile):
    model = build(profile=profile).train()
    out = model(episode(K=shots, H=49))
    assert out["logits"].shape == (2, 2, 49, 49) and set(out["losses"]) == {"dice"}
    out["losses"]["dice"].backward()
    trained = [model.down_supp[0].weight, model.supp_merge[0].weight, model.transformer["query"][1].cross.to_k.weight]
    if profile == "paper":
        trained.append(model.transformer["support"][0].attn.to_v.weight)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert all(p.grad is None for p in model.backbone.parameters())
    with torch.no_grad():
        assert torch.isfinite(model.eval()(episode(K=shots, H=49))["logits"]).all()


def test_bf16_autocast():
    """The engine's amp=bf16: the prior, the hash and the attention ops read the bf16 features as they are
    (computing in float32 inside); nothing is copied to float32 for them."""
    model = build().train()
    spy = OpInputDtypes()
    with spy, torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(episode(K=2))
    spy.assert_read_in(torch.bfloat16, ("max_cosine", "lsh_hash", "prototype_attention"))
    out["losses"]["dice"].backward()
    assert out["logits"].dtype == torch.bfloat16 and torch.isfinite(out["losses"]["dice"])
    assert torch.isfinite(model.transformer["query"][0].cross.to_v.weight.grad).all()


def test_same_seed_same_result():
    """Training: the same torch seed gives the same clustering and dropout; evaluation: each episode is
    clustered with eval_seed + its index, so a result does not depend on the batch it is in or on torch's RNG
    (up to the convolutions' rounding, which depends on the batch size)."""
    runs = []
    for _ in range(2):
        model = build().train()
        torch.manual_seed(5)
        out = model(episode(K=2))
        out["losses"]["dice"].backward()
        runs.append((out["logits"], model.query_merge[0].weight.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
    model, batch = build().eval(), episode(K=2)
    with torch.no_grad():
        torch.manual_seed(1)
        both = model(batch)["logits"]
        torch.manual_seed(2)
        alone = model({k: v[1:] for k, v in batch.items()})["logits"]
        torch.testing.assert_close(both[1:], alone)  # convolutions may round differently per batch size
        other = model(dict(batch, index=batch["index"] + 1))["logits"]  # another clustering seed is another draw
        assert (other - both).abs().max() > 1e-3


def test_bad_inputs():
    model = build().train()
    batch = episode(K=2)
    with pytest.raises(ValueError, match="support_masks .* do not match"):
        model(dict(batch, support_masks=batch["support_masks"][:, :1]))  # 2 shots, 1 mask
    with pytest.raises(ValueError, match="support_masks .* do not match"):
        model(dict(batch, support_masks=batch["support_masks"][..., :-1]))
    with pytest.raises(ValueError, match="query_mask must be"):
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
    # A support without foreground is not an error (the code's fallback: the centre tokens are the foreground
    # for the clustering; zero MAP vector and zero prior); a fully padded shot neither.
    empty = dict(batch, support_masks=torch.zeros_like(batch["support_masks"]))
    padded = batch["support_masks"].clone()
    padded[:, 1] = 255
    with torch.no_grad():
        model.eval()
        assert torch.isfinite(model(empty)["logits"]).all()
        assert torch.isfinite(model(dict(batch, support_masks=padded))["logits"]).all()


def test_padded_support_tokens_are_excluded():
    """The clustering gets the support padding (support_masks == 255) as its token-validity mask, and the
    support self-attention does not attend to padded tokens: their content under the padding may change
    without changing the support tokens' attention output."""
    model, batch = build().eval(), episode(K=2)
    seen = {}

    def spy(maps, masks, *, valid, **kw):
        seen["valid"], seen["masks"] = valid, masks
        return ops.support_prototypes(maps, masks, valid=valid, **kw)
    model.backend = SimpleNamespace(**{**vars(model.backend), "support_prototypes": spy})
    # and the model hands the support self-attention the padding as its key-validity mask
    model.transformer["support"][0].attn.register_forward_pre_hook(lambda mod, args: seen.update(keys=args[2]))
    with torch.no_grad():
        model(batch)
    last = batch["support_masks"][-1:]  # evaluation clusters episode by episode: the spy saw the last one
    assert torch.equal(seen["valid"], last != 255) and torch.equal(seen["masks"], (last == 1).float())
    assert seen["keys"] is not None and seen["keys"].any() and not seen["keys"].all()
    layer, pos = model.transformer["support"][0].attn, sine_encoding(4, 4, 32)
    x, valid = torch.randn(2, 16, 32), torch.rand(2, 16) < 0.6
    changed = torch.where(valid[..., None], x, torch.randn(2, 16, 32))
    with torch.no_grad():
        a, b = layer(x, pos, valid), layer(changed, pos, valid)
    torch.testing.assert_close(a[valid], b[valid])


@pytest.mark.slow
@pytest.mark.skipif(not MSRC.is_dir(), reason=f"MSRC-v2 not found at {MSRC}")
def test_overfits_real_msrc_episodes():
    """Two real MSRC-v2 episodes (cow, sheep; MobileNetV2 ImageNet weights, frozen; 64-d, Transformer dropout 0)
    at 129 x 129 (a 17 x 17 token grid) fitted to query foreground IoU >= 0.9 (pooled), Adam 2e-3; measured:
    0.90 after 90 steps (0.86-0.89 plateau at 97 x 97, whose 13 x 13 grid limits the upsampled boundary)."""
    model = build(weights="imagenet", reduce_dim=64, heads=4, k_fg=10, k_bg=20, dropout=0.0)
    iou, steps = fit_until(model, msrc_episodes(size=129), lr=2e-3, steps=150, every=10,
                           loss=lambda losses: losses["dice"])
    assert iou >= 0.9, f"query foreground IoU {iou:.3f} after {steps} steps"


@pytest.mark.slow
def test_paper_size_forward_backward():
    """ResNet-50 (deep stem, OS 8, random init) at 473 x 473, 1-shot, batch 1, paper profile: shapes, the
    60 x 60 grid, finite gradients."""
    model = build(backbone="resnet50_v2", reduce_dim=256, heads=8, k_fg=None, k_bg=None).train()
    out = model(episode(B=1, H=473))
    assert out["logits"].shape == (1, 2, 473, 473)
    out["losses"]["dice"].backward()
    assert model.down_query[0].weight.grad.shape == (256, 1536, 1, 1)
    assert (model.p["k_fg"], model.p["k_bg"]) == (50, 100)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_init_from_a_stage_b_checkpoint(tmp_path):
    """Stage C as its own run starts from a stage-B checkpoint (model.params.init): every weight, strictly."""
    stage_b = build(seed=3)
    path = tmp_path / "last.pt"
    torch.save({"format": "fsskern-checkpoint", "model": stage_b.state_dict()}, path)
    stage_c = build(seed=4, init=str(path))
    assert all(torch.equal(v, stage_c.state_dict()[k]) for k, v in stage_b.state_dict().items())
    with pytest.raises(ValueError, match="does not fit this model"):
        build(init=str(path), reduce_dim=16)
    # a resume or an evaluation, whose checkpoint sets every weight, does not read it (nor need it to exist)
    from fsskern.engine.config import load_config
    from fsskern.engine.trainer import for_checkpoint
    cfg = load_config(None, ["model.name=umtfss", f"model.params.init={tmp_path / 'gone.pt'}"])
    assert for_checkpoint(cfg).model.params["init"] is None and cfg.model.params["init"].endswith("gone.pt")
    rilfs = load_config(None, ["model.name=rilfs", f"model.params.base_weights={tmp_path / 'gone.pt'}"])
    assert for_checkpoint(rilfs).model.params["base_weights"] is None  # RILFS / BAM's phase-1 file likewise
    from fsskern.backbones import WeightsError
    with pytest.raises(WeightsError, match="model.params.init .*gone.pt not found"):  # one line, no traceback
        build(init=str(tmp_path / "gone.pt"))
    # the CPU recipes' output stride 16: a coarser grid, the same model
    assert build(output_stride=16).eval()(episode(H=65))["logits"].shape == (2, 2, 65, 65)


def test_label_lists_are_seeded_nested_and_sized_as_the_code():
    label_lists = load_script(Path(__file__).resolve().parents[1] / "python" / "make_label_lists.py").label_lists
    ids = [f"img{i:04d}" for i in range(5953)]
    lists = label_lists(ids, [5, 10, 20, 100], seed=0)
    assert [len(v) for v in lists.values()] == [297, 595, 1190, 5953]  # the code's PASCAL list sizes
    assert set(lists[5]) <= set(lists[10]) <= set(lists[20]) and lists[100] == ids
    assert lists[5] == sorted(lists[5]) and label_lists(ids, [5], seed=0)[5] == lists[5]
    assert label_lists(ids, [5], seed=1)[5] != lists[5]
