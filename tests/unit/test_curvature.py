import pytest
import torch

from ftbook.methods import curvature


def _tiny_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=gen)
    y = torch.randn(16, 2, generator=gen)
    w1 = torch.randn(3, 4, generator=gen).requires_grad_()
    w2 = torch.randn(4, 2, generator=gen).requires_grad_()

    def loss_of(a, b):
        return ((torch.tanh(x @ a) @ b - y) ** 2).mean()

    return (w1, w2), loss_of


def _exact_hessian(params, loss_of):
    flat = torch.cat([p.detach().flatten() for p in params])
    sizes = [p.numel() for p in params]

    def f(v):
        parts = torch.split(v, sizes)
        return loss_of(*[q.view_as(p) for q, p in zip(parts, params)])

    return torch.autograd.functional.hessian(f, flat)


@pytest.mark.parametrize("method,iters", [("power", 300), ("lanczos", 40)])
def test_matches_exact_top_eigenvalue(method, iters):
    params, loss_of = _tiny_problem()
    eig = torch.linalg.eigvalsh(_exact_hessian(params, loss_of))
    top = eig.max().item()
    value, estimates = curvature.top_hessian_eigenvalue(lambda: loss_of(*params), params, iters=iters, tol=1e-7,
                                                        method=method)
    assert abs(value - top) <= 1e-3 * abs(top)
    assert len(estimates) >= 2


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_quadratic_with_known_spectrum(method):
    a = torch.diag(torch.tensor([5.0, 2.0, -1.0]))
    x = torch.zeros(3, requires_grad=True)
    value, _ = curvature.top_hessian_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iters=200, tol=1e-9, method=method)
    assert abs(value - 5.0) < 1e-4


def test_negative_dominant_eigenvalue_is_shifted_away():
    """|−7| > 3: plain power iteration would report −7; the sharpness is the largest eigenvalue, 3."""
    a = torch.diag(torch.tensor([-7.0, 3.0, 1.0]))
    x = torch.zeros(3, requires_grad=True)
    for method in ("power", "lanczos"):
        value, _ = curvature.top_hessian_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iters=500, tol=1e-10,
                                                    method=method)
        assert abs(value - 3.0) < 1e-3


def test_lanczos_finds_the_top_under_a_dominant_negative_bulk():
    """A spectrum like unstable training's: one large negative eigenvalue, a bulk near 0, a small top.
    Shifted power iteration barely moves in 30 products; Lanczos finds the top."""
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(200, 200, generator=gen, dtype=torch.float64))
    spectrum = torch.cat([torch.tensor([-500.0, 3.0, 2.5]), torch.linspace(-0.5, 0.5, 197)]).double()
    a = (q * spectrum) @ q.T
    x = torch.zeros(200, dtype=torch.float64, requires_grad=True)
    value, _ = curvature.top_hessian_eigenvalue(lambda: 0.5 * x @ a @ x, [x], iters=30, tol=1e-6)
    assert abs(value - 3.0) < 0.05


def test_scales_give_preconditioned_hessian():
    params, loss_of = _tiny_problem(1)
    h = _exact_hessian(params, loss_of)
    scales = [0.25, 4.0]
    d = torch.cat([torch.full((p.numel(),), s) for p, s in zip(params, scales)])
    eig = torch.linalg.eigvalsh(d.sqrt()[:, None] * h * d.sqrt()[None, :])
    top = eig.max().item()
    value, _ = curvature.top_hessian_eigenvalue(lambda: loss_of(*params), params, iters=60, tol=1e-8,
                                                scales=scales)
    assert abs(value - top) <= 1e-3 * abs(top)


def test_model_sharpness_is_deterministic_and_positive():
    from ftbook.methods import mup

    model = mup.make_model(50, 32, "mup", seq_len=8, seed=0)
    batch = torch.randint(0, 50, (4, 8), generator=torch.Generator().manual_seed(0))
    a = curvature.model_sharpness(model, batch, iters=15)
    b = curvature.model_sharpness(model, batch, iters=15)
    assert a == b and a > 0
    g = curvature.model_sharpness(model, batch, iters=15, groups=mup.param_groups(model))
    assert g > 0
