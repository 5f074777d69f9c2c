"""Unit tests of adaptive/: cropping, policies, models, interface, FLOPs, weights.

Everything runs on tiny tensors (a 32x32 "micro" configuration) so the file
takes seconds on 2 CPU cores.  Early-exit tests live in test_adaptive_early_exit.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torchvision

from adaptive import (
    AdaFocusV2,
    AdaFocusV2Config,
    BackboneConfig,
    FullFrameConfig,
    available_models,
    build_model,
    coarse_to_fine_order,
    count_macs,
    select_state,
    split_state,
    stack_states,
    state_from_bytes,
    state_to_bytes,
)
from adaptive.backbones import MobileNetV2Features, ResNetFeatures, build_backbone
from adaptive.cropping import centres_on, centres_to_boxes, interpolate_crop, interpolate_crop_reference
from adaptive.heads import AccumulatedMaxPoolClassifier
from adaptive.interface import config_from_dict, normalize_uint8_clip
from adaptive.policies import FixedPatchPolicy, RecurrentPatchPolicy

torch.set_num_threads(min(2, torch.get_num_threads()))


def micro_config(**overrides) -> AdaFocusV2Config:
    cfg = AdaFocusV2Config(
        num_classes=5,
        input_size=32,
        glance_size=16,
        patch_size=16,
        glance=BackboneConfig(arch="mobilenet_v2", width_mult=0.25, output_stride=8, out_channels=16),
        local=BackboneConfig(arch="resnet", layers=(1, 1, 1, 1), block="basic", base_width=8),
        policy_hidden_size=16,
        policy_channels=8,
    )
    return dataclasses.replace(cfg, **overrides)


def make_clip(B=2, T=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, 3, size, size, generator=g), torch.randint(0, 5, (B,), generator=g)


# --------------------------------------------------------------------------- cropping
def test_crop_matches_literal_eq6():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 20, 24, generator=g, dtype=torch.float64)
    c = torch.rand(3, 2, generator=g, dtype=torch.float64)
    for crop, out in ((8, None), (8.0, 8), (10, 6)):
        a = interpolate_crop(x, c, crop, out)
        b = interpolate_crop_reference(x, c, crop, out)
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_crop_aligned_reproduces_pixels_and_stays_inside():
    x = torch.arange(2 * 20 * 24, dtype=torch.float64).view(1, 2, 20, 24)
    # Eq. (4): left edge at x0 = u (W - S); u = 4/16 -> x0 = 4, u = 6/12 -> y0 = 6
    patch = interpolate_crop(x, torch.tensor([[4 / 16, 6 / 12]], dtype=torch.float64), 8)
    torch.testing.assert_close(patch, x[:, :, 6:14, 4:12], rtol=0, atol=1e-9)
    # the extreme centres put the patch against the corners, never outside
    torch.testing.assert_close(interpolate_crop(x, torch.zeros(1, 2, dtype=torch.float64), 8), x[:, :, :8, :8])
    torch.testing.assert_close(interpolate_crop(x, torch.ones(1, 2, dtype=torch.float64), 8), x[:, :, 12:, 16:])


def test_crop_3d_cube():
    v = torch.randn(2, 3, 10, 20, 24, dtype=torch.float64)
    c = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    cube = interpolate_crop(v, c, (8, 6, 4))  # (x, y, t) sizes
    assert cube.shape == (2, 3, 4, 6, 8)
    torch.testing.assert_close(cube[0], v[0, :, :4, :6, :8])
    torch.testing.assert_close(cube[1], v[1, :, 6:, 14:, 16:])


def test_crop_gradient_matches_finite_differences():
    """Eq. (7)-(8): d patch / d centre by autograd equals central finite differences (float64)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 17, 23, generator=g, dtype=torch.float64)
    w = torch.randn(2, 3, 7, 7, generator=g, dtype=torch.float64)
    # centres whose sample points are away from pixel centres (bilinear kinks)
    c = torch.tensor([[0.313, 0.577], [0.731, 0.219]], dtype=torch.float64, requires_grad=True)

    def objective(centres):
        return (interpolate_crop(x, centres, 7) * w).sum()

    (grad,) = torch.autograd.grad(objective(c), c)
    eps = 1e-6
    fd = torch.zeros_like(c)
    for i in range(c.shape[0]):
        for j in range(2):
            d = torch.zeros_like(c)
            d[i, j] = eps
            fd[i, j] = (objective(c.detach() + d) - objective(c.detach() - d)) / (2 * eps)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)
    assert grad.abs().min() > 0
    # and torch's own checker, on the whole Jacobian
    assert torch.autograd.gradcheck(lambda cc: interpolate_crop(x, cc, 7), (c,), eps=1e-6, atol=1e-6)


def test_boxes():
    boxes = centres_to_boxes(torch.tensor([[0.0, 1.0], [0.5, 0.5]]), 0.5)
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 0.5, 0.5, 1.0], [0.25, 0.25, 0.75, 0.75]]))
    # centres_on inverts Eq. (4): the crop's middle lands on the point, or as near as the frame allows
    points = torch.tensor([[0.3, 0.6], [0.05, 0.99]])
    boxes = centres_to_boxes(centres_on(points, 0.5), 0.5)
    torch.testing.assert_close((boxes[:, :2] + boxes[:, 2:]) / 2, torch.tensor([[0.3, 0.6], [0.25, 0.75]]))


# --------------------------------------------------------------------------- policies, heads
def test_recurrent_policy_shapes_and_range():
    pi = RecurrentPatchPolicy(in_channels=16, feature_hw=(2, 2), hidden_size=12, reduced_channels=8)
    h = pi.init_hidden(4)
    for _ in range(3):
        c, h = pi(torch.randn(4, 16, 2, 2), h)
    assert c.shape == (4, 2) and h.shape == (4, 12)
    assert ((c > 0) & (c < 1)).all()


def test_fixed_policies():
    maps = torch.zeros(64, 4, 1, 1)
    h = torch.zeros(64, 0)
    c, _ = FixedPatchPolicy("centre")(maps, h)
    assert torch.equal(c, torch.full((64, 2), 0.5))
    torch.manual_seed(0)
    a, _ = FixedPatchPolicy("random")(maps, h)
    torch.manual_seed(0)
    b, _ = FixedPatchPolicy("random")(maps, h)
    assert torch.equal(a, b) and ((a >= 0) & (a <= 1)).all() and a.std() > 0.1
    g, _ = FixedPatchPolicy("gaussian", gaussian_std=0.25)(maps, h)
    assert ((g >= 0) & (g <= 1)).all() and (g - 0.5).abs().mean() < (a - 0.5).abs().mean() + 0.1


def test_accumulated_max_pool_step_equals_clip():
    head = AccumulatedMaxPoolClassifier(6, 3)
    z = torch.randn(2, 5, 6)
    logits = head(z)
    pooled = head.init_pool(2)
    for t in range(5):
        lt, pooled = head.step(z[:, t], pooled)
        torch.testing.assert_close(lt, logits[:, t])
    torch.testing.assert_close(logits[:, 0], head.fc(z[:, 0]))  # p_1 from frame 1 only


# --------------------------------------------------------------------------- models
@pytest.mark.parametrize("name", ["adafocus_v2", "full_frame"])
def test_forward_shapes(name):
    cfg = micro_config() if name == "adafocus_v2" else FullFrameConfig.matching(micro_config())
    model = build_model(name, cfg)
    clip, _ = make_clip(B=2, T=4)
    out = model(clip)
    assert out.logits.shape == (2, 4, 5)
    assert out.flops.shape == (2, 4) and out.flops.dtype == torch.float64
    assert torch.all(out.flops == model.flops_per_step(4))
    if name == "adafocus_v2":
        assert out.extra["boxes"].shape == (2, 4, 4) and out.extra["centres"].shape == (2, 4, 2)
        b = out.extra["boxes"]
        assert (b >= 0).all() and (b <= 1).all()
        torch.testing.assert_close(b[..., 2] - b[..., 0], torch.full((2, 4), 0.5))


def _grads(module: nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def test_gradients_reach_every_component():
    torch.manual_seed(0)
    model = AdaFocusV2(micro_config())
    clip, labels = make_clip()
    loss, logs = model.loss(clip, labels)
    loss.backward()
    for name in ("glance_encoder", "local_encoder", "classifier", "policy", "glance_head", "local_head"):
        grads = _grads(getattr(model, name))
        assert all(g is not None for g in grads), name
        assert sum(float(g.abs().sum()) for g in grads) > 0, name
    # the policy learns only through the crop (its input is detached): its output layer has a gradient
    assert model.policy.fc.weight.grad.abs().sum() > 0
    assert {"loss", "ce_fc", "ce_glance", "ce_local", "ce_fc_random", "acc"} <= set(logs)


def test_policy_gradient_flows_through_the_crop_only():
    """Without the classification path through the patch, pi gets no gradient."""
    torch.manual_seed(0)
    model = AdaFocusV2(micro_config(auxiliary_supervision=False, diversity_augmentation=False))
    clip, labels = make_clip()
    enc = model.encode(clip)
    (enc["e_l"].sum()).backward()
    assert model.policy.fc.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    enc = model.encode(clip)
    (enc["e_g"].sum()).backward()
    assert model.policy.fc.weight.grad is None


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient(stop_gradient):
    """Section 3.3: with stop-gradient, nothing from pi reaches fG."""
    torch.manual_seed(0)
    model = AdaFocusV2(micro_config(stop_gradient=stop_gradient))
    clip, _ = make_clip()
    enc = model.encode(clip)
    enc["centres"].sum().backward()  # a loss that depends on fG only through pi
    g = [p.grad for p in model.glance_encoder.parameters()]
    if stop_gradient:
        assert all(x is None for x in g)
    else:
        assert sum(float(x.abs().sum()) for x in g if x is not None) > 0


def test_technique_switches():
    clip, labels = make_clip()
    naive = AdaFocusV2(micro_config(auxiliary_supervision=False, diversity_augmentation=False, stop_gradient=False))
    assert not hasattr(naive, "glance_head")
    loss, logs = naive.loss(clip, labels)
    assert set(logs) == {"ce_fc", "loss", "acc", "centre_std"}
    torch.testing.assert_close(torch.tensor(logs["loss"]), torch.tensor(logs["ce_fc"]))  # Eq. (9)
    full = AdaFocusV2(micro_config())
    _, logs = full.loss(clip, labels)
    expect = 0.5 * (logs["ce_fc"] + logs["ce_glance"] + logs["ce_local"])
    assert logs["loss"] > expect  # + 1/2 L'_random


def test_determinism_with_seed():
    def run():
        torch.manual_seed(123)
        model = AdaFocusV2(micro_config())
        clip, labels = make_clip(seed=5)
        loss, _ = model.loss(clip, labels)  # includes the random patches of Eq. (11)
        loss.backward()
        return loss.detach(), model.policy.fc.weight.grad.clone(), model(clip).logits.detach()

    a, b = run(), run()
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("policy", ["learned", "random", "centre", "gaussian"])
def test_step_reproduces_forward(policy):
    torch.manual_seed(0)
    model = AdaFocusV2(micro_config(policy=policy)).eval()
    clip, _ = make_clip(B=3, T=5)
    with torch.no_grad():
        torch.manual_seed(7)
        out = model(clip)
        torch.manual_seed(7)
        state = model.init_state(3)
        for t in range(5):
            logits, state, flops, extra = model.step(clip[:, t], state)
            torch.testing.assert_close(logits, out.logits[:, t], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(flops, out.flops[:, t])
            torch.testing.assert_close(extra["boxes"], out.extra["boxes"][:, t], rtol=1e-4, atol=1e-5)
    assert torch.equal(state["t"], torch.full((3,), 5))


def test_full_frame_step_reproduces_forward():
    torch.manual_seed(0)
    model = build_model("full_frame", FullFrameConfig.matching(micro_config())).eval()
    clip, _ = make_clip(B=2, T=4)
    with torch.no_grad():
        out = model(clip)
        state = model.init_state(2)
        for t in range(4):
            logits, state, flops, _ = model.step(clip[:, t], state)
            torch.testing.assert_close(logits, out.logits[:, t], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(flops, out.flops[:, t])


def test_full_frame_focus_is_the_attention_peak_on_the_stride_16_map():
    """FullFrameModel.focus_centres: the patch centred on the cell where fL's stride-16 map (ResNet's
    layer3) has the most activation energy (sum of squares over channels); the inverse of Eq. (4).
    The stride-32 map (layer4) is not used, whatever it holds."""
    torch.manual_seed(0)
    model = build_model("full_frame", FullFrameConfig.matching(micro_config())).eval()
    encoder = model.local_encoder
    assert [m.shape[-1] for m in encoder.stage_outputs(torch.zeros(1, 3, 64, 64))] == [16, 8, 4, 2]

    def hot_cell(frames):  # an 8x8 stride-16 map for 128 px: energy in channels 0 and 1 at row 2, column 6
        maps = torch.zeros(len(frames), 4, 8, 8)
        maps[:, 0, 2, 6], maps[:, 1, 2, 6] = -2.0, 1.0  # sign does not matter: energy 5
        maps[:, 2, 5, 1] = 2.0  # energy 4: second
        return maps

    def decoy(frames):
        maps = torch.zeros(len(frames), 4, 4, 4)
        maps[:, 0, 0, 0] = 100.0
        return maps

    encoder.stage_outputs = lambda frames: [hot_cell(frames), decoy(frames)]
    f = 0.5
    centres = model.focus_centres(torch.zeros(3, 3, 128, 128), patch_fraction=f)
    middle = torch.tensor([6.5 / 8, 2.5 / 8])  # the hot cell's centre, normalised (x, y)
    torch.testing.assert_close(centres, ((middle - f / 2) / (1 - f)).clamp(0, 1).expand(3, 2))
    box = centres_to_boxes(centres, f)[0]
    assert box[0] <= middle[0] <= box[2] and box[1] <= middle[1] <= box[3]


def test_policy_teacher_forces_the_patches_and_pulls_pi():
    """set_policy_teacher (our extension): fL is trained on the teacher's patches, pi is pulled toward
    the teacher's centres, inference ignores the teacher and the state dict does not hold it."""

    class Teacher(nn.Module):
        def focus_centres(self, frames, patch_fraction):
            return torch.tensor([[0.9, 0.1]]).expand(len(frames), 2)

    torch.manual_seed(0)
    model = AdaFocusV2(micro_config(diversity_augmentation=False, lr_policy=1e-2))
    keys = set(model.state_dict())
    model.set_policy_teacher(Teacher())
    assert set(model.state_dict()) == keys
    clip, labels = make_clip(B=4, T=2)
    # teacher forcing: the loss is the loss on the teacher's patches
    enc = model.encode(clip, patch_centres=torch.tensor([0.9, 0.1]).expand(4, 2, 2))
    model.train()
    loss, logs = model.loss(clip, labels)
    expect = model._objective(enc["e_g"], enc["e_l"], labels)["total"]
    torch.testing.assert_close(loss - model.config.policy_teacher_weight * logs["policy_pull"], expect)
    # the pull moves pi toward the teacher's centres
    optimizer = torch.optim.Adam(model.policy.parameters(), lr=1e-2)
    with torch.no_grad():
        before = float(((model(clip).extra["centres"] - torch.tensor([0.9, 0.1])) ** 2).mean())
    for _ in range(30):
        model.train()
        loss, _ = model.loss(clip, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        after = float(((model(clip).extra["centres"] - torch.tensor([0.9, 0.1])) ** 2).mean())
    assert after < 0.25 * before
    model.set_policy_teacher(None)
    _, logs = model.loss(clip, labels)
    assert "policy_pull" not in logs


def test_states_stack_split_serialise():
    """A server can batch streams, split them, ship them and resume: results unchanged."""
    torch.manual_seed(0)
    model = AdaFocusV2(micro_config()).eval()
    a, _ = make_clip(B=1, T=4, seed=1)
    b, _ = make_clip(B=1, T=4, seed=2)
    with torch.no_grad():
        ref_a = model(a).logits
        ref_b = model(b).logits
        sa, sb = model.init_state(1), model.init_state(1)
        _, sa, _, _ = model.step(a[:, 0], sa)  # stream a starts alone
        state = stack_states([sa, sb])  # b joins a batch with a
        frames = torch.cat([a[:, 1], b[:, 0]])
        logits, state, _, _ = model.step(frames, state)
        torch.testing.assert_close(logits[0], ref_a[0, 1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(logits[1], ref_b[0, 0], rtol=1e-4, atol=1e-5)
        sa, sb = split_state(state)
        sa = state_from_bytes(state_to_bytes(sa))  # serialised in between
        logits, sa, _, _ = model.step(a[:, 2], sa)
        torch.testing.assert_close(logits[0], ref_a[0, 2], rtol=1e-4, atol=1e-5)
        kept = select_state(stack_states([sa, sb]), [1])
        assert torch.equal(kept["t"], torch.tensor([1]))
    assert all(isinstance(v, torch.Tensor) and v.shape[0] == 1 for v in sa.values())


# --------------------------------------------------------------------------- FLOPs
def test_flops_conv_and_linear_hand_count():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1, bias=True)
    # output 16x16; MACs = Cout * Cin * k * k * Hout * Wout (bias not counted)
    assert count_macs(conv, torch.zeros(1, 3, 32, 32)) == 8 * 3 * 3 * 3 * 16 * 16
    dw = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8)
    assert count_macs(dw, torch.zeros(1, 8, 10, 10)) == 8 * 1 * 3 * 3 * 10 * 10
    lin = nn.Linear(20, 7)
    assert count_macs(lin, torch.zeros(1, 20)) == 20 * 7
    gru = nn.GRUCell(10, 6)
    assert count_macs(gru, torch.zeros(1, 10), torch.zeros(1, 6)) == 3 * 6 * (10 + 6)


def test_count_macs_does_not_touch_batchnorm_stats():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = net[1].running_mean.clone()
    count_macs(net, torch.randn(1, 3, 8, 8) + 5)
    assert torch.equal(net[1].running_mean, before) and net.training


def test_model_flops_profile_is_sum_of_components():
    model = AdaFocusV2(micro_config())
    comp = model.component_macs()
    assert set(comp) == {"glance", "policy", "local", "classifier"}
    assert comp["local"] == count_macs(model.local_encoder, torch.zeros(1, 3, 16, 16))
    assert comp["classifier"] == model.classifier.in_features * 5
    prof = model.flops_profile(6)
    assert prof.steps == [sum(comp.values())] * 6 and prof.total == 6 * sum(comp.values())
    full = build_model("full_frame", FullFrameConfig.matching(micro_config()))
    assert full.component_macs()["local"] > 3 * comp["local"]  # 32x32 frame vs 16x16 patch
    assert build_model("adafocus_v2", micro_config(policy="random")).component_macs()["policy"] == 0


def test_torchvision_backbone_flops_in_papers_units():
    """ResNet-50 at 224 is '4.1 GFLOPs' and MobileNetV2 '0.3 GFLOPs' in the papers: multiply-adds."""
    with torch.device("meta"):  # shapes only: counting needs no arithmetic
        r50 = build_backbone(BackboneConfig.resnet(50))
        assert 4.0e9 < count_macs(r50, torch.zeros(1, 3, 224, 224)) < 4.2e9
        mn2 = build_backbone(BackboneConfig.mobilenet_v2())
        assert 0.29e9 < count_macs(mn2, torch.zeros(1, 3, 224, 224)) < 0.32e9


# --------------------------------------------------------------------------- weights
def test_resnet_loads_local_torchvision_weights(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    net = ResNetFeatures((2, 2, 2, 2), "basic", 64, weights=str(path))
    torch.testing.assert_close(net.layer3[1].conv2.weight, tv.layer3[1].conv2.weight)
    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        tv.eval(), net.eval()
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        torch.testing.assert_close(net(x), ref)
    with pytest.raises(RuntimeError):
        ResNetFeatures((1, 1, 1, 1), "basic", 64, weights=str(path))  # wrong architecture


def test_mobilenet_and_model_load_local_weights(tmp_path, monkeypatch):
    tv = torchvision.models.mobilenet_v2(weights=None, width_mult=0.25)
    path = tmp_path / "mbv2.pth"
    torch.save(tv.state_dict(), path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    net = MobileNetV2Features(0.25, output_stride=8, weights=str(path))
    assert calls and all(flag is True for flag in calls)
    torch.testing.assert_close(net.features[5].conv[0][0].weight, tv.features[5].conv[0][0].weight)
    cfg = micro_config()
    cfg = dataclasses.replace(cfg, glance=dataclasses.replace(cfg.glance, weights=str(path)))
    model = AdaFocusV2(cfg)
    torch.testing.assert_close(model.glance_encoder.features[3].conv[0][0].weight, tv.features[3].conv[0][0].weight)
    # a file saved from a truncated, re-closed extractor (e.g. a trained glance encoder) loads too
    own = tmp_path / "glance.pth"
    torch.save(model.glance_encoder.state_dict(), own)
    again = MobileNetV2Features(0.25, output_stride=8, out_channels=16, weights=str(own))
    for (k, a), (_, b) in zip(again.state_dict().items(), model.glance_encoder.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)


# --------------------------------------------------------------------------- interface, sampling
def test_registry_and_configs():
    assert {"adafocus_v2", "full_frame"} <= set(available_models())
    m = build_model("adafocus_v2", {"num_classes": 3, "input_size": 32, "glance_size": 16, "patch_size": 16,
                                    "glance": {"width_mult": 0.25, "output_stride": 8, "out_channels": 16},
                                    "local": {"arch": "resnet", "layers": [1, 1, 1, 1], "block": "basic",
                                              "base_width": 8},
                                    "policy_hidden_size": 8})
    assert m.num_classes == 3 and m.config.local.layers == (1, 1, 1, 1)
    assert build_model("adafocus_v2", micro_config(), policy="centre").config.policy == "centre"
    with pytest.raises(KeyError):
        build_model("nope")
    with pytest.raises(ValueError):
        config_from_dict(AdaFocusV2Config, {"patch": 3})
    tiny = AdaFocusV2Config.tiny()
    assert abs(tiny.patch_fraction - 96 / 224) < 0.01
    paper = AdaFocusV2Config.paper()
    assert (paper.input_size, paper.glance_size, paper.patch_size, paper.policy_hidden_size) == (224, 96, 128, 2048)
    groups = {g["name"]: g["lr"] for g in AdaFocusV2(micro_config(lr_policy=1e-3)).param_groups()}
    assert groups["policy"] == 1e-3 and set(groups) == {"glance", "local", "classifier", "policy"}


def test_coarse_to_fine_order():
    assert coarse_to_fine_order(8) == [4, 2, 6, 1, 3, 5, 7, 0]
    for T in range(1, 40):
        assert sorted(coarse_to_fine_order(T)) == list(range(T))
    pipelines = pytest.importorskip("pipelines.data.sampling")
    for T in range(1, 40):
        assert coarse_to_fine_order(T) == [int(i) for i in pipelines.coarse_to_fine_order(T)]


def test_normalize_uint8_clip():
    clip = torch.full((1, 2, 4, 4, 3), 255, dtype=torch.uint8)
    x = normalize_uint8_clip(clip)
    assert x.shape == (1, 2, 3, 4, 4)
    torch.testing.assert_close(x[0, 0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))


def test_no_ray_import_in_adaptive():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "adaptive"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import ray" not in text and "from ray" not in text, path
