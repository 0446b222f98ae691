"""The kernel view (ftbook.methods.ntk) against plain autograd on tiny models."""
import pytest
import torch
from torch import nn

from ftbook import modeling
from ftbook.methods import ntk


class LastTokenLogits(nn.Module):
    """A tiny Llama read at the last position, three of its logits: a (batch, 3) output like a classifier's."""

    def __init__(self, seed=0):
        super().__init__()
        config = modeling.tiny_config("llama", vocab_size=40, n_layer=2, d_model=16, n_head=2, max_len=16)
        self.lm = modeling.from_config(config, seed=seed).double()

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids).logits[:, -1, :3]


def _flat_params(model, names):
    return torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])


def _explicit_jacobian(model, input_ids, names):
    """J (N, C, P) by torch.autograd.functional.jacobian of the flattened parameter vector."""
    from torch.func import functional_call

    shapes = [model.get_parameter(n).shape for n in names]
    sizes = [s.numel() for s in shapes]

    def f(flat):
        values = [chunk.reshape(s) for chunk, s in zip(flat.split(sizes), shapes)]
        return functional_call(model, dict(zip(names, values)), (input_ids,))

    return torch.autograd.functional.jacobian(f, _flat_params(model, names))


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return LastTokenLogits(), torch.randint(0, 40, (5, 6))


def test_jacobian_and_kernel_match_autograd(tiny):
    model, ids = tiny
    names = ntk.tangent_names(model)
    explicit = _explicit_jacobian(model, ids, names)                      # (N, C, P)
    assert torch.allclose(ntk.jacobian(model, {"input_ids": ids}), explicit, atol=1e-10)
    kernel = ntk.empirical_ntk(model, {"input_ids": ids[:3]}, {"input_ids": ids[3:]})
    assert kernel.shape == (3, 2, 3, 3)
    assert torch.allclose(kernel, torch.einsum("acp,bdp->abcd", explicit[:3], explicit[3:]), atol=1e-10)
    gram = ntk.empirical_ntk(model, {"input_ids": ids})
    flat = gram.permute(0, 2, 1, 3).reshape(15, 15)
    assert torch.allclose(flat, flat.T) and torch.linalg.eigvalsh(flat).min() > -1e-9  # a kernel: symmetric, PSD


def test_kernel_over_a_subset_of_parameters(tiny):
    model, ids = tiny
    only_head = lambda name: "layers.1." in name
    names = ntk.tangent_names(model, only_head)
    assert names and all("layers.1." in n for n in names)
    explicit = _explicit_jacobian(model, ids, names)
    kernel = ntk.empirical_ntk(model, {"input_ids": ids}, trainable=only_head)
    assert torch.allclose(kernel, torch.einsum("acp,bdp->abcd", explicit, explicit), atol=1e-10)


def test_linearized_model_is_first_order_taylor(tiny):
    model, ids = tiny
    before = model(ids).detach()
    lin = ntk.Linearized(model)
    assert [n for n, p in lin.named_parameters() if p.requires_grad] == [f"delta.{i}" for i in range(len(lin.names))]
    assert torch.allclose(lin(ids), before, atol=1e-12)                  # δ = 0: the model itself
    torch.manual_seed(1)
    with torch.no_grad():
        for d in lin.delta:
            d.copy_(torch.randn_like(d) * 1e-2)
    jac = _explicit_jacobian(model, ids, lin.names)
    delta = torch.cat([d.detach().reshape(-1) for d in lin.delta])
    assert torch.allclose(lin(ids), before + jac @ delta, atol=1e-10)    # f(θ₀) + J δ
    # ... and not the model moved to θ₀ + δ (that is nonlinear in δ): the test can tell them apart
    from torch.func import functional_call
    moved = functional_call(model, {n: model.get_parameter(n) + d for n, d in zip(lin.names, lin.delta)}, (ids,))
    assert not torch.allclose(lin(ids), moved, atol=1e-6)
    # the gradient with respect to δ is Jᵀ g
    g = torch.randn_like(before)
    (lin(ids) * g).sum().backward()
    grad = torch.cat([d.grad.reshape(-1) for d in lin.delta])
    expected = torch.einsum("ncp,nc->p", jac, g)
    # (Llama's RMSNorm computes in float32 even in a float64 model: agreement to ~1e-7, not to rounding)
    assert torch.allclose(grad, expected, rtol=1e-5, atol=1e-6), (grad - expected).abs().max()
    assert all(not p.requires_grad for p in model.parameters())          # the wrapped model is frozen


def test_linearized_leaves_other_parameters_at_theta0(tiny):
    model, ids = tiny
    lin = ntk.Linearized(model, trainable=lambda n: "layers.0." in n)
    assert all("layers.0." in n for n in lin.names)
    with pytest.raises(ValueError, match="empty"):
        ntk.Linearized(LastTokenLogits(), trainable=lambda n: False)


def test_gradient_descent_on_the_linear_model_converges_to_kernel_regression():
    """Malladi et al.'s premise: training f_lin by gradient descent on the squared loss (plus ridge/2 |δ|²) from δ = 0
    ends at kernel regression with the eNTK and that ridge. A small MLP, so it converges in a few thousand steps."""
    torch.manual_seed(0)
    x_train, x_test = torch.randn(6, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    y_train = 3 * torch.randn(6, 2, dtype=torch.float64)

    def make_net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()

    def descend(model, params, steps=3000):
        optimizer = torch.optim.SGD(params, lr=float(1.0 / (top + ridge)))
        for _ in range(steps):
            optimizer.zero_grad()
            shift = sum((p ** 2).sum() for p in params) if model is lin else \
                sum(((p - p0) ** 2).sum() for p, p0 in zip(params, start))
            (0.5 * ((model(x_train) - y_train) ** 2).sum() + 0.5 * ridge * shift).backward()
            optimizer.step()

    net = make_net()
    f0_train, f0_test = net(x_train).detach(), net(x_test).detach()
    k_train = ntk.empirical_ntk(net, {"input": x_train})
    k_test = ntk.empirical_ntk(net, {"input": x_test}, {"input": x_train})
    top = float(torch.linalg.eigvalsh(k_train.permute(0, 2, 1, 3).reshape(12, 12)).max())
    ridge = 0.01 * top
    predicted = ntk.kernel_regression(k_train, y_train, k_test, f0_train=f0_train, f0_test=f0_test, ridge=ridge)
    lin = ntk.Linearized(net)
    descend(lin, list(lin.delta))
    assert torch.allclose(lin(x_test).detach(), predicted, atol=1e-6)    # what kernel regression predicts
    # the real network trained the same way (same ridge, towards θ₀) leaves the tangent space: the check can fail
    real = make_net()
    start = [p.detach().clone() for p in real.parameters()]
    descend(real, list(real.parameters()))
    assert (real(x_test).detach() - predicted).abs().max() > 1e-2


def test_kernel_regression_matches_the_closed_form_and_checks_shapes():
    torch.manual_seed(0)
    feats = torch.randn(5, 7, dtype=torch.float64)                        # a linear kernel: K = Φ Φᵀ per output
    k = torch.einsum("ap,bp->ab", feats, feats)[:, :, None, None]
    y = torch.randn(5, 1, dtype=torch.float64)
    new = torch.randn(3, 7, dtype=torch.float64)
    k_test = torch.einsum("ap,bp->ab", new, feats)[:, :, None, None]
    ridge = 0.3
    expected = (new @ feats.T) @ torch.linalg.solve(feats @ feats.T + ridge * torch.eye(5, dtype=torch.float64), y)
    assert torch.allclose(ntk.kernel_regression(k, y, k_test, ridge=ridge), expected, atol=1e-10)
    f0 = torch.ones(5, 1, dtype=torch.float64)
    shifted = ntk.kernel_regression(k, y + f0, k_test, f0_train=f0, f0_test=torch.ones(3, 1, dtype=torch.float64),
                                    ridge=ridge)
    assert torch.allclose(shifted, expected + 1, atol=1e-10)              # the pre-trained outputs are the offset
    with pytest.raises(ValueError, match="ridge"):
        ntk.kernel_regression(k, y, k_test, ridge=-1)
    with pytest.raises(ValueError, match="shapes"):
        ntk.kernel_regression(k, y, k_test[:, :4])
