"""The kernel view of fine-tuning (Malladi et al. 2023): the linearized model and the empirical NTK.

Around its pre-trained weights θ₀ a network's output moves, to first order, as

    f(x; θ₀ + δ)  ≈  f_lin(x; δ) = f(x; θ₀) + J(x) δ,        J(x) = ∂f(x; θ)/∂θ at θ₀.

* :class:`Linearized` is f_lin as a module whose only trainable tensors are the shifts δ (one per parameter of the
  model it wraps, zero at the start). Its forward pass is one ``torch.func.jvp``: the output at θ₀ and the directional
  derivative J(x) δ together, without ever forming J. Train it exactly like the model — same optimiser, data and
  schedule — and the gap to real fine-tuning measures how far fine-tuning leaves the tangent space.
* :func:`empirical_ntk` forms the kernel K(x, x') = J(x) J(x')ᵀ from per-example gradients, and
  :func:`kernel_regression` predicts with it: f(x) = f(x; θ₀) + K(x, X) (K(X, X) + ridge I)⁻¹ (Y − f(X; θ₀)).
  Gradient descent on the squared loss of f_lin, started at δ = 0, converges to exactly this predictor with
  ridge → 0 (tested): the linearized model and kernel regression with the eNTK are one model, reached two ways.

``model`` is any module whose forward returns one tensor of shape (batch, outputs), e.g. a classifier's logits.
Inside ``jvp`` attention runs on PyTorch's math kernel: the fused CPU and GPU kernels have no forward-mode derivative.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping

import torch
from torch import nn


def _math_attention():
    """``scaled_dot_product_attention`` through its composite ("math") kernel, which forward-mode AD can pass."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the math kernel is the fallback anyway
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def tangent_names(model: nn.Module, trainable: Callable[[str], bool] | None = None) -> list[str]:
    """The parameters the tangent space spans: floating-point parameters (tied weights once), filtered by
    ``trainable(name)`` when given."""
    return [n for n, p in model.named_parameters() if p.is_floating_point() and (trainable is None or trainable(n))]


class Linearized(nn.Module):
    """``model`` linearized around its current weights θ₀: ``forward(*args) = model(*args; θ₀) + J δ``.

    The wrapped model is frozen (its parameters stop requiring gradients) and never changes; the shifts ``delta``
    (zeros at the start, one per parameter named in :attr:`names`) are the only trainable tensors, so an optimiser
    over ``parameters()`` trains the linear model. ``trainable(name)`` restricts the tangent space to some
    parameters (the others stay at θ₀, as frozen layers do in fine-tuning).
    """

    def __init__(self, model: nn.Module, trainable: Callable[[str], bool] | None = None):
        super().__init__()
        self.model = model
        self.names = tangent_names(model, trainable)
        if not self.names:
            raise ValueError("no parameter to linearize around: the tangent space is empty")
        for p in model.parameters():
            p.requires_grad_(False)
        self.delta = nn.ParameterList([nn.Parameter(torch.zeros_like(model.get_parameter(n))) for n in self.names])

    def forward(self, *args, **kwargs) -> torch.Tensor:
        from torch.func import functional_call, jvp

        primals = tuple(self.model.get_parameter(n).detach() for n in self.names)

        def output(*values):
            return functional_call(self.model, dict(zip(self.names, values)), args, kwargs)

        with _math_attention():
            at_theta0, along_delta = jvp(output, primals, tuple(self.delta))
        return at_theta0 + along_delta

    def shift(self) -> dict[str, torch.Tensor]:
        """``{parameter name: δ}``: how far the linear model has moved from θ₀."""
        return {n: d.detach() for n, d in zip(self.names, self.delta)}


def jacobian(model: nn.Module, inputs: Mapping[str, torch.Tensor], *,
             trainable: Callable[[str], bool] | None = None) -> torch.Tensor:
    """Per-example Jacobians of ``model(**inputs)`` (shape (N, C)) with respect to its parameters: (N, C, P).

    One forward pass per example and one backward pass per output, so it is exact for any model (no ``vmap``
    over library code); P counts the parameters :func:`tangent_names` lists, flattened in that order."""
    names = tangent_names(model, trainable)
    params = [model.get_parameter(n) for n in names]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    n_rows = len(next(iter(inputs.values())))
    rows = []
    try:
        for i in range(n_rows):
            out = model(**{k: v[i:i + 1] for k, v in inputs.items()})[0]
            grads = []
            for c in range(out.shape[0]):
                parts = torch.autograd.grad(out[c], params, retain_graph=c < out.shape[0] - 1, allow_unused=True)
                grads.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                        for g, p in zip(parts, params)]))
            rows.append(torch.stack(grads))
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    return torch.stack(rows).detach()


def empirical_ntk(model: nn.Module, inputs_a: Mapping[str, torch.Tensor],
                  inputs_b: Mapping[str, torch.Tensor] | None = None, *,
                  trainable: Callable[[str], bool] | None = None) -> torch.Tensor:
    """The empirical neural tangent kernel K[i, j, c, d] = ⟨∂f_c(a_i)/∂θ, ∂f_d(b_j)/∂θ⟩ at the current weights,
    shape (Na, Nb, C, C); ``inputs_b=None`` gives the kernel of ``inputs_a`` with itself. (Malladi et al. keep only the
    diagonal c = d, one kernel per label; the full tensor holds both.)"""
    jac_a = jacobian(model, inputs_a, trainable=trainable)
    jac_b = jac_a if inputs_b is None else jacobian(model, inputs_b, trainable=trainable)
    return torch.einsum("acp,bdp->abcd", jac_a, jac_b)


def kernel_regression(k_train: torch.Tensor, y_train: torch.Tensor, k_test: torch.Tensor, *,
                      f0_train: torch.Tensor | None = None, f0_test: torch.Tensor | None = None,
                      ridge: float = 0.0) -> torch.Tensor:
    """Kernel regression from the pre-trained outputs: f0(x) + K(x, X) (K(X, X) + ridge I)⁺ (Y − f0(X)).

    ``k_train`` (N, N, C, C) and ``k_test`` (M, N, C, C) as :func:`empirical_ntk` returns them; ``y_train`` and
    ``f0_train`` (N, C); ``f0_test`` (M, C); ``f0`` = 0 when not given. Solved in float64 with a pseudo-inverse, so
    ``ridge=0`` gives the minimum-norm interpolant — the limit of gradient descent on the linearized model.
    Returns the predicted outputs (M, C)."""
    if ridge < 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}")
    n, _, c, _ = k_train.shape
    m = k_test.shape[0]
    if k_test.shape[1:] != (n, c, c) or y_train.shape != (n, c):
        raise ValueError(f"shapes disagree: k_train {tuple(k_train.shape)}, k_test {tuple(k_test.shape)}, "
                         f"y_train {tuple(y_train.shape)}")
    f0_train = torch.zeros(n, c) if f0_train is None else f0_train
    f0_test = torch.zeros(m, c) if f0_test is None else f0_test
    gram = k_train.double().permute(0, 2, 1, 3).reshape(n * c, n * c)
    cross = k_test.double().permute(0, 2, 1, 3).reshape(m * c, n * c)
    residual = (y_train.double() - f0_train.double()).reshape(n * c)
    weights = torch.linalg.pinv(gram + ridge * torch.eye(n * c, dtype=torch.float64), hermitian=True) @ residual
    return (cross @ weights).reshape(m, c).to(k_test.dtype) + f0_test.to(k_test.dtype)
