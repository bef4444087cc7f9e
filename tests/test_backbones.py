"""Backbones: shapes and strides at 65x65, frozen BN, strict weight loading and its errors, ImageNet MobileNetV2."""
import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch.testing import assert_close

from fsskern.backbones import (LAYERS, LeanBatchNorm2d, WeightsError, create_backbone, expected_keys, freeze,
                               list_backbones, load_weights, mobilenet_weights_file)

# Output sizes at 65x65 for each stride (conv arithmetic of 3x3/7x7 stride-2 convs and pools on 8k+1 inputs).
SIZE = {2: 33, 4: 17, 8: 9, 16: 5}
FSS = ["resnet50_v2", "resnet50", "vgg16_bn", "mobilenet_v2"]  # the 101s: test_resnet101_layout
CHANNELS = {"resnet50_v2": [128, 256, 512, 1024, 2048], "resnet50": [64, 256, 512, 1024, 2048],
            "vgg16_bn": [64, 128, 256, 512, 512], "mobilenet_v2": [16, 24, 32, 96, 320]}
STRIDES = {"resnet50_v2": [4, 4, 8, 8, 8], "vgg16_bn": [2, 4, 8, 16, 16], "mobilenet_v2": [2, 4, 8, 8, 8]}


@pytest.fixture(scope="module")
def small_input():
    return torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(0))


def test_registry_lists_every_backbone():
    assert set(FSS) | {"resnet101", "resnet101_v2", "xception65", "deeplabv3plus_resnet50",
                       "deeplabv3plus_mobilenet_v2", "deeplabv3plus_xception65"} <= set(list_backbones())
    with pytest.raises(KeyError, match="available: .*resnet50_v2"):
        create_backbone("resnet18")


def test_vgg16_bn_random_init_is_torchvisions():
    # make_layers alone keeps PyTorch's default conv init (non-zero biases); torchvision's VGG re-initialises
    convs = [m for m in create_backbone("vgg16_bn").features if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert not conv.bias.any() and abs(float(conv.weight.detach().std()) / (2 / fan_out) ** 0.5 - 1) < 0.1

@pytest.mark.parametrize("model,backbone", [("popnet", "resnet50"), ("rilfs", "deeplabv3plus_resnet50"),
                                            ("crcnet", "deeplabv3plus_resnet50"), ("umtfss", "deeplabv3plus_resnet50"),
                                            ("dpcl", "deeplabv3plus_mobilenet_v2"),
                                            ("baseline", "deeplabv3plus_mobilenet_v2")])
def test_a_model_names_the_backbones_it_reads(model, backbone):
    # POPNet used to fail with "unexpected keyword argument 'width'", the others with KeyError 'layer4'
    from fsskern.engine.config import ModelConfig
    from fsskern.models import create_model
    with pytest.raises(ValueError, match=f"backbone '{backbone}' is not of the kind it reads; choose one of"):
        create_model(ModelConfig(name=model, backbone=backbone, weights=None))

def test_frozen_bn_with_random_weights_warns():
    # POPNet's paper configs (frozen BN) without model.weights trained a ResNet-50 with no normalisation, silently
    with pytest.warns(UserWarning, match="frozen BatchNorm with random weights normalises nothing"):
        create_backbone("resnet50", frozen_bn=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_backbone("resnet50", frozen_bn=False)
    # DeepLabV3+ warns once for itself, not again for the encoder it builds inside (POPNet builds three: with
    # weights given, every build warned falsely before they loaded)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        create_backbone("deeplabv3plus_mobilenet_v2", frozen_bn=True, width=16)
    assert [str(w.message).split(":")[0] for w in seen] == ["backbone 'deeplabv3plus_mobilenet_v2'"]


def test_deeplab_with_imagenet_weights_does_not_warn():
    _mobilenet_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        create_backbone("deeplabv3plus_mobilenet_v2", weights="imagenet", frozen_bn=True, width=16)


@pytest.mark.parametrize("name", FSS)
def test_layer_shapes_strides_and_channels(name, small_input):
    model = create_backbone(name).eval()
    with torch.no_grad():
        out = model(small_input)
    assert list(out) == list(LAYERS)
    assert [model.channels[k] for k in LAYERS] == CHANNELS[name]
    assert [model.strides[k] for k in LAYERS] == STRIDES.get(name, STRIDES["resnet50_v2"])
    for k, v in out.items():
        assert v.shape == (1, model.channels[k], SIZE[model.strides[k]], SIZE[model.strides[k]]), k


@pytest.mark.parametrize("name", ["resnet50_v2", "mobilenet_v2", "xception65"])
def test_layers_argument_returns_only_those_and_stops_early(name, small_input):
    model = create_backbone(name).eval()
    ran = []
    last_block = {"resnet50_v2": lambda: model.layer4, "mobilenet_v2": lambda: model.features[-1],
                  "xception65": lambda: model.conv5}[name]()
    last_block.register_forward_hook(lambda *_: ran.append("layer4"))
    with torch.no_grad():
        full = model(small_input)
        ran.clear()
        some = model(small_input, layers=["layer3", "layer1"])
    assert list(some) == ["layer1", "layer3"]  # in network order, whatever order was asked
    for k in some:
        assert torch.equal(some[k], full[k])
    assert ran == ([] if name != "xception65" else ["layer4"])  # xception's layer2 needs block1's output: all run
    for bad in (["layer5"], [], ("layer2", "decoder")):
        with pytest.raises(ValueError, match="subset of"):
            model(small_input, layers=bad)


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_lean_frozen_bn_is_bn_to_the_bit_and_keeps_no_activation(name, small_input):
    """Trainable convs under frozen BN: LeanBatchNorm2d gives nn.BatchNorm2d's outputs and gradients exactly, and
    autograd keeps fewer bytes (the BN inputs); with batch statistics it is nn.BatchNorm2d itself."""
    def run(lean, frozen_bn=True):
        torch.manual_seed(0)
        net = create_backbone(name, frozen_bn=frozen_bn).train()
        bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert bns and all(type(m) is LeanBatchNorm2d for m in bns)
        with torch.no_grad():
            for m in bns:
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2), m.weight.normal_(1, 0.1)
                m.bias.normal_(0, 0.1)
                if not lean:
                    m.__class__ = torch.nn.BatchNorm2d
        saved, params = {}, {q.data_ptr() for q in net.parameters()}

        def pack(t):  # the activations autograd keeps, each storage once, parameters left out
            if t.data_ptr() not in params:
                saved[t.data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(small_input)
        sum(v.square().mean() for v in out.values()).backward()
        grads = {n: q.grad for n, q in net.named_parameters() if q.grad is not None}
        return out, grads, sum(saved.values()), [m.running_mean for m in bns]

    (out, grads, saved, _), (out0, grads0, saved0, _) = run(True), run(False)
    assert len(grads) > 20 and grads.keys() == grads0.keys()
    assert all(torch.equal(out[k], out0[k]) for k in out) and all(torch.equal(grads[k], grads0[k]) for k in grads)
    assert saved < 0.75 * saved0, (saved, saved0)
    (out, grads, saved, stats), (out0, grads0, saved0, stats0) = run(True, False), run(False, False)
    assert saved == saved0 and all(torch.equal(a, b) for a, b in zip(stats, stats0))  # training BN: untouched
    assert all(torch.equal(grads[k], grads0[k]) for k in grads)


@pytest.mark.parametrize("name", ["resnet101", "resnet101_v2"])
def test_resnet101_layout(name):
    with torch.device("meta"):  # no memory, no init: the layout only
        model = create_backbone(name)
    assert len(model.layer3) == 23 and model.layer3[22].conv2.dilation == (2, 2)
    assert [model.channels[k] for k in LAYERS] == CHANNELS[name.replace("101", "50")]
    stem = {"conv1.weight", "bn1.weight", "conv2.weight", "conv3.weight", "bn3.running_var"}
    assert (stem <= set(expected_keys(name))) == name.endswith("_v2")


@pytest.mark.parametrize("name,output_stride,last", [("resnet50", 16, 5), ("resnet50", 32, 3),
                                                     ("mobilenet_v2", 16, 5), ("mobilenet_v2", 32, 3)])
def test_other_output_strides(name, output_stride, last, small_input):
    with torch.no_grad():
        out = create_backbone(name, output_stride=output_stride).eval()(small_input)
    assert out["layer4"].shape[-1] == last


def test_resnet_dilation_styles_and_last_relu(small_input):
    psp = create_backbone("resnet50")
    assert [b.conv2.dilation for b in psp.layer3] == [(2, 2)] * 6 and psp.layer4[0].conv2.dilation == (4, 4)
    tvs = create_backbone("resnet50", dilation="torchvision")
    assert tvs.layer3[0].conv2.dilation == (1, 1) and tvs.layer4[0].conv2.dilation == (2, 2)
    signed = create_backbone("resnet50", last_relu=False).eval()
    with torch.no_grad():
        assert (signed(small_input)["layer4"] < 0).any()
    assert "fc.weight" not in signed.state_dict()


def test_vgg16_bn_without_last_relu(small_input):
    """PANet's VGG (lastRelu=False): conv5_3's BN output, signed; the same weights and the same layer0-layer3."""
    torch.manual_seed(0)
    plain = create_backbone("vgg16_bn").eval()
    signed = create_backbone("vgg16_bn", last_relu=False).eval()
    assert signed.state_dict().keys() == plain.state_dict().keys()
    signed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        a, b = plain(small_input), signed(small_input)
    assert torch.equal(a["layer3"], b["layer3"]) and (b["layer4"] < 0).any()
    assert torch.equal(a["layer4"], b["layer4"].relu())


def test_frozen_bn_stays_frozen_in_train_mode():
    model = create_backbone("resnet50_v2").train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    assert model.conv1.weight.requires_grad and model.training
    before = bns[0].running_mean.clone()
    model(torch.randn(2, 3, 33, 33))
    assert torch.equal(bns[0].running_mean, before)
    free = create_backbone("resnet50_v2", frozen_bn=False).train()
    assert free.bn1.training and free.bn1.weight.requires_grad


def test_freeze_whole_backbone():
    model = freeze(create_backbone("mobilenet_v2"))
    model.train()
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_deeplabv3plus_outputs(small_input):
    for name, low in (("deeplabv3plus_resnet50", 256), ("deeplabv3plus_mobilenet_v2", 24)):
        model = create_backbone(name).eval()
        assert model.low_level[0].in_channels == low
        with torch.no_grad():
            out = model(small_input)
        assert out["decoder"].shape == (1, 256, 17, 17) and out["encoder"].shape == (1, 256, 5, 5)
        model.train()
        backbone_bns = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert not any(m.training for m in backbone_bns)
        assert model.aspp.project[1].training  # the head's BatchNorms are trained
    narrow = create_backbone("deeplabv3plus_mobilenet_v2", width=64).eval()  # the CPU recipes' width
    with torch.no_grad():
        out = narrow(small_input)
    assert narrow.channels["decoder"] == 64 and out["decoder"].shape == (1, 64, 17, 17)
    assert out["encoder"].shape == (1, 64, 5, 5)


# ---- weights -----------------------------------------------------------------------------------------

def randomised(model):
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return model


def test_weights_round_trip(tmp_path):
    name = "mobilenet_v2"  # the smallest file; the layer-split test loads resnet50_v2 and vgg16_bn
    src = randomised(create_backbone(name))
    state = src.state_dict()
    files = {"plain.pth": state, "ddp.pth": {f"module.{k}": v for k, v in state.items()},
             "wrapped.pth": {"state_dict": state, "epoch": 3},
             "head.pth": dict(state, **{"classifier.1.weight": torch.zeros(2, 3)})}
    for fname, content in files.items():
        torch.save(content, tmp_path / fname)
        dst = create_backbone(name, weights=str(tmp_path / fname))
        for k, v in dst.state_dict().items():
            assert torch.equal(v, state[k]), (fname, k)
    assert set(state) == set(expected_keys(name))


def test_pfenet_layer_split_names_load(tmp_path):
    # PFENet/BAM models hold the backbone as layer0 = Sequential(conv1, bn1, relu1, conv2, ..., maxpool).
    src = randomised(create_backbone("resnet50_v2"))
    names = {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4, "conv3": 6, "bn3": 7}
    state = {}
    for k, v in src.state_dict().items():
        head, _, rest = k.partition(".")
        state[f"layer0.{names[head]}.{rest}" if head in names else k] = v
    torch.save(state, tmp_path / "pfenet.pth")
    dst = create_backbone("resnet50_v2", weights=str(tmp_path / "pfenet.pth"))
    assert torch.equal(dst.conv3.weight, src.conv3.weight)
    vgg = randomised(create_backbone("vgg16_bn"))
    bam = {}
    for k, v in vgg.state_dict().items():  # BAM's get_vgg16_layer: features.9 -> layer1.2
        _, index, rest = k.split(".", 2)
        layer = next(n for n, (a, b) in vgg.split.items() if a <= int(index) < b)
        bam[f"{layer}.{int(index) - vgg.split[layer][0]}.{rest}"] = v
    assert "layer1.0.weight" in bam
    torch.save(bam, tmp_path / "bam_vgg.pth")
    dst = create_backbone("vgg16_bn", weights=str(tmp_path / "bam_vgg.pth"))
    assert all(torch.equal(v, vgg.state_dict()[k]) for k, v in dst.state_dict().items())


def test_wrong_file_names_missing_and_unexpected_keys(tmp_path):
    stem_part = {k: v for k, v in create_backbone("resnet50").state_dict().items() if k.startswith(("conv1", "bn1",
                                                                                                   "layer1."))}
    torch.save(stem_part, tmp_path / "torchvision_stem.pth")
    with pytest.raises(WeightsError) as err:
        create_backbone("resnet50_v2", weights=str(tmp_path / "torchvision_stem.pth"))
    message = str(err.value)
    assert "torchvision_stem.pth" in message and "resnet50_v2" in message
    assert "missing: conv2.weight, bn2.weight" in message
    assert "shape mismatches" in message and "layer1.0.conv1.weight" in message
    torch.save({"foo.weight": torch.zeros(1)}, tmp_path / "foreign.pth")
    n_missing = sum(not k.endswith("num_batches_tracked") for k in expected_keys("mobilenet_v2"))
    with pytest.raises(WeightsError, match=rf"(?s){n_missing} missing: features.0.0.weight, .*\.\.\..*"
                                           r"1 unexpected: foo.weight"):
        create_backbone("mobilenet_v2", weights=str(tmp_path / "foreign.pth"))
    (tmp_path / "truncated.pth").write_bytes(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(WeightsError, match="truncated.pth: cannot be read"):
        create_backbone("mobilenet_v2", weights=str(tmp_path / "truncated.pth"))
    with pytest.raises(WeightsError, match="not found"):
        create_backbone("mobilenet_v2", weights=str(tmp_path / "absent.pth"))
    with pytest.raises(WeightsError, match="mobilenet_v2 only"):
        create_backbone("vgg16_bn", weights="imagenet")


def test_deeplab_loads_a_backbone_only_file(tmp_path):
    src = randomised(create_backbone("mobilenet_v2"))
    torch.save(src.state_dict(), tmp_path / "mobilenet.pth")
    model = create_backbone("deeplabv3plus_mobilenet_v2", weights=str(tmp_path / "mobilenet.pth"))
    assert torch.equal(model.backbone.features[17].conv[2].weight, src.features[17].conv[2].weight)
    randomised(model)
    torch.save(model.state_dict(), tmp_path / "full.pth")
    again = load_weights(create_backbone("deeplabv3plus_mobilenet_v2"), tmp_path / "full.pth",
                         "deeplabv3plus_mobilenet_v2")
    assert torch.equal(again.decoder[1][0].weight, model.decoder[1][0].weight)


def test_deeplab_loads_the_backbone_of_another_codes_checkpoint(tmp_path):
    """A VainF-style DeepLabV3+ checkpoint ({"model_state": backbone.* + classifier.*}): its backbone loads, its
    head is dropped with a warning (it failed as "not a state dict of tensors", and unwrapped, as 45 missing)."""
    source = create_backbone("deeplabv3plus_resnet50")
    head = {"classifier.aspp.0.weight": torch.randn(4, 3), "classifier.head.bias": torch.randn(4)}
    state = {**{f"backbone.{k}": v for k, v in source.backbone.state_dict().items()}, **head}
    torch.save({"model_state": state, "cur_itrs": 30000, "best_score": np.float64(0.77)}, tmp_path / "vainf.pth")
    with pytest.warns(UserWarning, match="the backbone loaded, the file's head dropped \\(2 keys: classifier"):
        model = create_backbone("deeplabv3plus_resnet50", weights=str(tmp_path / "vainf.pth"))
    for k, v in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    # a backbone that does not fit is still refused, key by key
    del state["backbone.conv1.weight"]
    torch.save({"model_state": state}, tmp_path / "cut.pth")
    with pytest.raises(WeightsError, match="1 missing: conv1.weight"), warnings.catch_warnings():
        warnings.simplefilter("error")  # and no "the backbone loaded" before the refusal
        create_backbone("deeplabv3plus_resnet50", weights=str(tmp_path / "cut.pth"))


# The public POPNet code's Xception key names (networks/deeplab_xception_synBN.py), a sample across the flows.
XCEPTION_KEYS = ["conv1.weight", "bn2.running_var", "block1.rep.0.depthwise.weight", "block1.rep.4.pointwise_bn.bias",
                 "block1.skip.weight", "block2.rep.3.pointwise.weight", "block2.block2_lastconv.1.depthwise_bn.weight",
                 "block2.skipbn.running_mean", "block3.rep.5.depthwise.weight", "block19.rep.5.pointwise_bn.weight",
                 "block20.rep.3.pointwise.weight", "block20.rep.5.depthwise.weight", "block20.skip.weight",
                 "conv5.pointwise_bn.running_var"]


def test_xception65_layout_shapes_and_graphonomy_checkpoint(small_input, tmp_path):
    """Aligned Xception-65 (POPNet's encoder): the code's key names and shapes, strides at OS 16 and 8, a backward,
    and the backbone of a whole DeepLabV3+ checkpoint in the code's layout (xception_features.* + its head)."""
    keys = expected_keys("xception65")
    assert set(XCEPTION_KEYS) <= set(keys) and not any(k.startswith(("block4.skip", "block21", "bn3")) for k in keys)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in create_backbone("xception65").state_dict().items()}
    assert shapes["block20.rep.3.pointwise.weight"] == (1024, 728, 1, 1)
    assert shapes["block2.block2_lastconv.1.depthwise.weight"] == (256, 1, 3, 3)
    assert shapes["conv5.pointwise.weight"] == (2048, 1536, 1, 1)
    for os_, strides in ((16, [2, 4, 8, 16, 16]), (8, [2, 4, 8, 8, 8])):
        model = create_backbone("xception65", output_stride=os_, frozen_bn=False).train()
        out = model(small_input)
        assert [model.strides[k] for k in LAYERS] == strides
        for k, v in out.items():
            assert v.shape == (1, model.channels[k], SIZE[model.strides[k]], SIZE[model.strides[k]]), k
        out["layer4"].mean().backward()
        assert model.conv1.weight.grad.abs().sum() > 0
        assert model.block2.block2_lastconv[1].pointwise.weight.grad is not None
    with pytest.raises(ValueError, match="output_stride must be 16 or 8"):
        create_backbone("xception65", output_stride=32)

    src = randomised(create_backbone("xception65"))
    checkpoint = {f"module.xception_features.{k}": v for k, v in src.state_dict().items()}
    checkpoint.update({"module.aspp1.atrous_convolution.weight": torch.zeros(256, 2048, 1, 1),
                       "module.last_conv.0.weight": torch.zeros(256, 304, 3, 3)})  # the code's head: dropped
    torch.save({"state_dict": checkpoint}, tmp_path / "deeplab_v3plus_v3.pth")
    model = create_backbone("deeplabv3plus_xception65", weights=str(tmp_path / "deeplab_v3plus_v3.pth")).eval()
    assert torch.equal(model.backbone.block20.rep[5].depthwise.weight, src.block20.rep[5].depthwise.weight)
    assert model.low_level[0].in_channels == 256
    with torch.no_grad():
        out = model(small_input)
    assert out["decoder"].shape == (1, 256, 17, 17) and out["encoder"].shape == (1, 256, 5, 5)
    del checkpoint["module.xception_features.block7.rep.3.pointwise.weight"]
    torch.save(checkpoint, tmp_path / "short.pth")
    with pytest.raises(WeightsError, match="1 missing: block7.rep.3.pointwise.weight"):
        create_backbone("xception65", weights=str(tmp_path / "short.pth"))


def test_xception65_feeds_the_code_its_input_format():
    """The code's checkpoint was trained on BGR in [-1, 1]; fsskern's loaders give ImageNet-normalised RGB."""
    from fsskern.data.transforms import IMAGENET_MEAN, IMAGENET_STD
    torch.manual_seed(0)
    model = create_backbone("xception65").eval()
    raw = create_backbone("xception65", code_input=False).eval()
    raw.load_state_dict(model.state_dict())
    rgb = torch.rand(1, 3, 33, 33)  # [0, 1]
    normalised = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = model(normalised)
        assert_close(out["layer1"], raw(rgb.flip(1) * 2 - 1)["layer1"], rtol=1e-4, atol=1e-5)
        assert_close(model.block2(model.block1(out["layer0"])), out["layer2"])  # block2 whole = its split run


def test_xception_block_skip_reads_the_relud_input():
    """The code's in-place ReLU rewrites a block's input before its identity skip reads it; the weights were
    trained that way, so a middle-flow block adds relu(x), not x."""
    from fsskern.backbones.xception import Block
    block = Block(8, 8, 3).eval()
    x = torch.randn(1, 8, 9, 9, generator=torch.Generator().manual_seed(1))
    assert_close(block(x), block.rep(x) + x.relu())
    assert (x < 0).any()  # so the two readings differ


def _mobilenet_file():
    try:
        return mobilenet_weights_file()
    except WeightsError as e:
        pytest.skip(str(e))


def test_imagenet_mobilenet_matches_torchvision():
    path = _mobilenet_file()
    ours = create_backbone("mobilenet_v2", weights="imagenet").eval()
    reference = torchvision.models.mobilenet_v2()
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    reference.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(x)
        want = reference.features[:7](x)  # layer0..layer2 are not dilated: torchvision's exact output
        assert_close(got["layer2"], want, rtol=0, atol=0)
        assert got["layer4"].shape == (2, 320, 8, 8)
    dilated = ours.features[14].conv[1][0]
    assert dilated.dilation == (2, 2) and dilated.stride == (1, 1)  # first block of the 160 stage: stride removed
    assert torch.equal(dilated.weight, reference.features[14].conv[1][0].weight)


def test_deeplab_resnet_dilates_as_deeplab_ports():
    """deeplabv3plus_resnet50 follows torchvision's replace_stride_with_dilation (VainF's DeepLabV3+): the first
    block of a dilated layer keeps the previous dilation, so a checkpoint trained that way sees its own fields."""
    from fsskern.backbones import create_backbone
    for os_, layer3, layer4 in ((16, [1] * 6, [1, 2, 2]), (8, [1] + [2] * 5, [2, 4, 4])):
        net = create_backbone("deeplabv3plus_resnet50", output_stride=os_).backbone
        assert [b.conv2.dilation[0] for b in net.layer3] == layer3
        assert [b.conv2.dilation[0] for b in net.layer4] == layer4
