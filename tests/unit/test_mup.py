import math

import numpy as np
import pytest
import torch

from ftbook.methods import mup


def _groups(model):
    return {g["name"]: g for g in mup.param_groups(model)}


def test_mup_equals_sp_at_base_width():
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(0))
    sp = mup.make_model(40, 32, "sp", seq_len=8, seed=3)
    mu = mup.make_model(40, 32, "mup", seq_len=8, seed=3)
    assert torch.allclose(sp(input_ids=ids).logits, mu(input_ids=ids).logits)
    assert mup.lr_scales(sp) == mup.lr_scales(mu)


@pytest.mark.parametrize("width", [32, 64, 128])
def test_lr_multipliers_per_group(width):
    mu = mup.make_model(40, width, "mup", seq_len=8)
    sp = mup.make_model(40, width, "sp", seq_len=8)
    m = width / 32
    assert _groups(mu)["hidden"]["lr_scale"] == pytest.approx(1 / m)
    for name in ("embedding", "vector", "readout"):
        assert _groups(mu)[name]["lr_scale"] == 1.0
    assert all(g["lr_scale"] == 1.0 for g in mup.param_groups(sp))
    # every parameter is in exactly one group
    assert sum(len(g["params"]) for g in mup.param_groups(mu)) == len(list(mu.parameters()))
    opt = mup.adam(mu, 1e-2)
    assert sorted(g["lr"] for g in opt.param_groups)[0] == pytest.approx(1e-2 / m)


def test_group_membership():
    model = mup.make_model(40, 64, "mup", seq_len=8, qk_norm=True)
    names = {n: mup.parameter_group(n, p) for n, p in model.named_parameters()}
    assert names["wte.weight"] == names["wpe.weight"] == "embedding"
    assert names["readout.weight"] == "readout"
    assert names["blocks.0.attn.qkv.weight"] == names["blocks.1.fc_out.weight"] == "hidden"
    assert names["blocks.0.attn.q_norm.weight"] == names["ln_f.bias"] == "vector"


@pytest.mark.parametrize("width", [32, 128])
def test_init_std_per_group(width):
    model = mup.make_model(64, width, "mup", seq_len=16, seed=0)
    assert model.wte.weight.std().item() == pytest.approx(1.0, rel=0.05)           # constant in width
    qkv = model.blocks[0].attn.qkv.weight
    assert qkv.std().item() == pytest.approx(width ** -0.5, rel=0.05)              # 1/sqrt(fan_in)
    fc_out = model.blocks[0].fc_out.weight
    assert fc_out.std().item() == pytest.approx((4 * width) ** -0.5, rel=0.05)
    assert model.readout.weight.std().item() == pytest.approx(width ** -0.5, rel=0.05)
    assert torch.all(model.ln_f.weight == 1)


def test_multipliers():
    c = mup.GPTConfig(vocab_size=10, width=128, n_head=4, parametrization="mup", base_width=32)
    assert c.output_mult == pytest.approx(0.25)
    assert c.attn_scale == pytest.approx(math.sqrt(8) / 32)                       # 1/d, equal to SP at base
    s = mup.GPTConfig(vocab_size=10, width=128, n_head=4, parametrization="sp")
    assert s.output_mult == 1.0 and s.attn_scale == pytest.approx(1 / math.sqrt(32))
    with pytest.raises(ValueError):
        mup.GPTConfig(vocab_size=10, width=30, n_head=4)
    with pytest.raises(ValueError):
        mup.GPTConfig(vocab_size=10, parametrization="ntk")


def test_coordinate_check():
    """Yang et al.'s coordinate check: after a few Adam steps the residual stream's and the logits'
    scale is width-independent under muP and grows with width under SP."""
    rng = np.random.default_rng(0)
    data = {"input_ids": rng.integers(0, 16, size=(16, 16))}
    widths = [32, 64, 128, 256]
    sp = mup.coord_check(data, widths=widths, parametrization="sp", lr=0.02, steps=4, vocab_size=16)
    mu = mup.coord_check(data, widths=widths, parametrization="mup", lr=0.02, steps=4, vocab_size=16)
    growth = {name: {k: r[256][k] / r[32][k] for k in ("hidden", "logits")} for name, r in
              (("sp", sp), ("mup", mu))}
    assert growth["sp"]["hidden"] > 4.0 and growth["sp"]["logits"] > 2.0
    assert 0.75 < growth["mup"]["hidden"] < 1.33
    assert 0.5 < growth["mup"]["logits"] < 1.5
    assert mu[32] == sp[32]  # the same model at the base width


def test_forward_loss_and_logit_probe():
    model = mup.make_model(40, 32, "sp", seq_len=8)
    ids = torch.randint(0, 40, (2, 8))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 8, 40)
    assert abs(out.loss.item() - math.log(40)) < 1.5
    assert model.max_attention_logit() > 0


def test_the_attention_logit_probe_costs_no_sync_per_layer():
    """max_logit was a float() per layer and forward pass: a GPU stop each. It is a tensor now, read once."""
    model = mup.make_model(50, 32, "mup", seq_len=8, n_layer=3)
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        model(input_ids=ids)
    assert all(isinstance(b.attn.max_logit, torch.Tensor) for b in model.blocks)
    expected = max(float(b.attn.max_logit) for b in model.blocks)
    assert model.max_attention_logit() == expected and isinstance(model.max_attention_logit(), float)
