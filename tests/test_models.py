from __future__ import annotations

import pytest
import torch

from napari_r2au import available_architectures, create_model
from napari_r2au.models.blocks import RecurrentConv, RecurrentUnit, StepwiseBatchNorm

# Parameter counts of the widely used public implementation at width 64, 3 in, 1 out.
REFERENCE_COUNTS = {
    "unet": 34_527_041,
    "attention_unet": 34_878_573,
    "r2u_net": 39_091_393,
    "r2au_net": 39_442_925,
    "ru_net": 39_091_393,  # RU-Net drops only the residual add, which has no parameters
}


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("arch", sorted(REFERENCE_COUNTS))
def test_parameter_counts_match_reference(arch):
    assert (
        n_params(create_model(arch, in_channels=3, out_channels=1, base_width=64)) == REFERENCE_COUNTS[arch]
    )


def test_registry_names_and_unknown_name():
    assert available_architectures() == [
        "unet",
        "attention_unet",
        "ru_net",
        "r2u_net",
        "attention_res_unet",
        "r2au_net",
    ]
    with pytest.raises(ValueError, match="valid: unet, attention_unet"):
        create_model("transunet")


@pytest.mark.parametrize(
    "arch", ["unet", "attention_unet", "ru_net", "r2u_net", "attention_res_unet", "r2au_net"]
)
def test_forward_shapes_and_attention(arch):
    net = create_model(arch, in_channels=1, out_channels=2, base_width=4).eval()
    x = torch.randn(2, 1, 48, 64)
    logits = net(x)
    assert logits.shape == (2, 2, 48, 64)
    out, alphas = net(x, return_attention=True)
    assert torch.equal(out, logits)  # same pass, same result
    if "attention" in arch or arch == "r2au_net":
        assert [a.shape[-2:] for a in alphas] == [(48, 64), (24, 32), (12, 16), (6, 8)]
        for a in alphas:
            assert a.shape[1] == 1 and float(a.min()) >= 0 and float(a.max()) <= 1
    else:
        assert alphas == []


def test_three_d_is_a_parameter():
    net = create_model("r2au_net", in_channels=1, base_width=2, spatial_dims=3).eval()
    logits, alphas = net(torch.randn(1, 1, 16, 16, 16), return_attention=True)
    assert logits.shape == (1, 1, 16, 16, 16) and len(alphas) == 4


def test_recurrent_unit_applies_conv_t_plus_one_times():
    rcl = RecurrentConv(3, t=2)
    calls = []
    rcl.conv.register_forward_hook(lambda *a: calls.append(1))
    rcl(torch.randn(1, 3, 8, 8))
    assert len(calls) == 3


def test_ru_net_has_no_residual_and_r2_has_one():
    assert RecurrentUnit(2, 4, residual=False).residual is False
    assert create_model("r2u_net", base_width=2).encoder[0].residual is True
    assert create_model("ru_net", base_width=2).encoder[0].residual is False


def test_stepwise_bn_keeps_one_statistic_per_step():
    bn = StepwiseBatchNorm(4, steps=3).train()
    for step, shift in enumerate((0.0, 5.0, -3.0)):
        bn(torch.randn(64, 4, 4, 4) + shift, step)
    means = bn.running_mean.mean(dim=1)
    assert means[1] > means[0] > means[2]  # each step tracked its own distribution


def test_eval_mode_matches_train_mode_after_training():
    """The trap of PAPER.md: shared running stats make eval mode diverge from training."""
    torch.manual_seed(0)
    unit = RecurrentUnit(3, 8, t=2)
    optimizer = torch.optim.SGD(unit.parameters(), lr=0.01)
    data = [torch.randn(8, 3, 12, 12) * 2 + 1 for _ in range(40)]
    for x in data:  # train, then let the running statistics settle on the same distribution
        loss = unit(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for m in unit.modules():
            if isinstance(m, StepwiseBatchNorm):
                m.momentum = None  # cumulative average
                m.running_mean.zero_()
                m.running_var.fill_(1)
                m.num_batches_tracked.zero_()
        for x in data:
            unit(x)
        x = torch.randn(256, 3, 16, 16) * 2 + 1
        train_out = unit(x)
        unit.eval()
        eval_out = unit(x)
    rel = (eval_out - train_out).abs().mean() / train_out.abs().mean()
    assert rel < 0.05, f"eval-mode output departs from train-mode output by {rel:.3f}"


@pytest.mark.parametrize("arch", ["unet", "attention_unet", "r2u_net", "r2au_net"])
def test_batchnorm_folding_preserves_output(arch):
    from napari_r2au.models.fuse import fuse_for_inference

    torch.manual_seed(0)
    net = create_model(arch, base_width=4)
    net.train()
    for _ in range(3):  # non-trivial running statistics, different per recurrent step
        net(torch.randn(4, 3, 32, 32) * 3 + 1)
    net.eval()
    fused = fuse_for_inference(net)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref, ref_alpha = net(x, return_attention=True)
        out, alpha = fused(x, return_attention=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(alpha, ref_alpha):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", available_architectures())
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_widening_keeps_what_the_network_computes_and_the_new_channels_learn(arch, mode):
    from napari_r2au.models.widen import widen_network

    torch.manual_seed(0)
    narrow = create_model(arch, base_width=4, t=2)
    for module in narrow.modules():  # trained-looking statistics, not the identity defaults
        if hasattr(module, "running_var"):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    getattr(narrow, mode)()
    x = torch.randn(2, 3, 32, 32)
    wide = widen_network(narrow, 7)
    assert wide.training == narrow.training and wide.head.in_channels == 7
    with torch.no_grad():
        torch.testing.assert_close(wide(x), narrow(x), atol=1e-5, rtol=1e-5)
    # the new channels are not dead: one step moves the head's weights on them off zero
    wide.train()
    wide(x).mean().backward()
    assert wide.head.weight.grad[:, 4:].abs().sum() > 0
    assert wide.head.weight[:, 4:].abs().sum() == 0


def test_widening_refuses_a_narrower_width():
    from napari_r2au.models.widen import widen_network

    with pytest.raises(ValueError, match="narrower"):
        widen_network(create_model("r2au_net", base_width=8), 4)
