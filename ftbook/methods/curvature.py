"""Sharpness: the top eigenvalue of the loss Hessian, by power iteration on Hessian-vector products.

The Hessian of a model with N parameters is N x N — never formed. A Hessian-vector product costs about
two backward passes (Pearlmutter's trick: differentiate ``g(θ)·v`` once more), and power iteration

    v ← H v / ‖H v‖,     λ ≈ vᵀ H v

converges to the eigenvalue of largest magnitude in a few dozen products. The sharpness (Cohen et al. 2021,
Noci et al. 2024) is the largest eigenvalue, not the largest in magnitude; the Lanczos process, built from
the same products, finds it reliably even when a large negative eigenvalue dominates (default here).

``scales`` measures the sharpness *in the coordinates the optimizer moves*: with per-parameter learning
rates ``lr · s_i`` (muP's groups), gradient descent sees ``D^{1/2} H D^{1/2}`` with ``D = diag(s)``, and
its stability edge is ``2 / lr`` for the top eigenvalue of that matrix. With all scales 1 it is the plain
Hessian.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def hessian_vector_product(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                           vec: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` given ``grads`` computed with ``create_graph=True`` (the graph is kept for reuse)."""
    dot = sum((g * v).sum() for g, v in zip(grads, vec))
    return list(torch.autograd.grad(dot, params, retain_graph=True))


def _power_iteration(matvec, vec, iters: int, tol: float) -> tuple[float, list[torch.Tensor], list[float]]:
    estimates: list[float] = []
    for _ in range(iters):
        norm = torch.sqrt(sum((v * v).sum() for v in vec))
        vec = [v / norm for v in vec]
        hv = matvec(vec)
        estimates.append(float(sum((h * v).sum() for h, v in zip(hv, vec))))  # Rayleigh quotient
        vec = [h.detach() for h in hv]
        if len(estimates) > 2 and abs(estimates[-1] - estimates[-2]) <= tol * abs(estimates[-1]):
            break
    return estimates[-1], vec, estimates


def _lanczos(matvec, start: list[torch.Tensor], iters: int, tol: float) -> tuple[float, list[float]]:
    """Largest eigenvalue by the Lanczos process (full re-orthogonalisation; ``iters`` products at most)."""
    def dot(a, b):
        return sum((x * y).sum() for x, y in zip(a, b))

    norm = torch.sqrt(dot(start, start))
    basis = [[v / norm for v in start]]
    alphas, betas, estimates = [], [], []
    for j in range(iters):
        w = matvec(basis[j])
        alphas.append(float(dot(w, basis[j])))
        for u in basis:  # full re-orthogonalisation: a few dozen vectors, cheap next to the products
            c = dot(w, u)
            w = [x - c * y for x, y in zip(w, u)]
        t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            t = t + torch.diag(off, 1) + torch.diag(off, -1)
        estimates.append(float(torch.linalg.eigvalsh(t).max()))  # the largest Ritz value
        beta = float(torch.sqrt(dot(w, w)))
        converged = len(estimates) > 2 and abs(estimates[-1] - estimates[-2]) <= tol * abs(estimates[-1])
        if converged or beta < 1e-10:
            break
        betas.append(beta)
        basis.append([x / beta for x in w])
    return estimates[-1], estimates


def top_hessian_eigenvalue(loss_fn: Callable[[], torch.Tensor], params: Sequence[torch.Tensor], *,
                           iters: int = 20, tol: float = 1e-3, seed: int = 0,
                           scales: Sequence[float] | None = None,
                           method: str = "lanczos") -> tuple[float, list[float]]:
    """Largest (most positive) eigenvalue of ``D^{1/2} H D^{1/2}`` (``H`` the Hessian of ``loss_fn()`` in
    ``params``, ``D = diag(scales)``, default identity). Returns ``(eigenvalue, estimates per iteration)``.

    ``method="power"``: power iteration, which finds the eigenvalue of largest *magnitude*; when that is
    negative, a second power iteration on ``H − λ_neg I`` (spectrum shifted to be ≥ 0) looks for the
    largest. That second run converges slowly when ``|λ_neg| ≫ λ_max`` (the shifted spectrum is then
    bunched near its top) — which happens in unstable training. ``method="lanczos"`` (default) builds a
    Krylov basis from the same Hessian-vector products and reads the largest eigenvalue off a small
    tridiagonal matrix: it finds the top of the spectrum whatever the negative part does, in about as many
    products. Either stops when two successive estimates agree within ``tol`` (relative) or after ``iters``.
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    params = list(params)
    roots = [1.0] * len(params) if scales is None else [float(s) ** 0.5 for s in scales]
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def matvec(vec, shift=0.0):
        hv = hessian_vector_product(grads, params, [r * v for r, v in zip(roots, vec)])
        return [(r * h).detach() - shift * v for r, h, v in zip(roots, hv, vec)]

    gen = torch.Generator().manual_seed(seed)
    start = [torch.randn(p.shape, generator=gen).to(p) for p in params]
    if method == "lanczos":
        return _lanczos(matvec, start, iters, tol)
    value, _, estimates = _power_iteration(matvec, start, iters, tol)
    if value < 0:
        shifted, _, more = _power_iteration(lambda v: matvec(v, shift=value), start, iters, tol)
        estimates += [m + value for m in more]
        value = shifted + value
    return value, estimates


def model_sharpness(model, batch: torch.Tensor, *, iters: int = 20, tol: float = 1e-3, seed: int = 0,
                    groups: Sequence[dict] | None = None, method: str = "lanczos") -> float:
    """Sharpness of a causal LM's loss on ``batch`` (token ids). ``groups`` (as from
    :func:`ftbook.methods.mup.param_groups`) weight each parameter by its group's ``lr_scale``."""
    if groups is None:
        params = [p for p in model.parameters() if p.requires_grad]
        scales = None
    else:
        params = [p for g in groups for p in g["params"]]
        scales = [g.get("lr_scale", 1.0) for g in groups for _ in g["params"]]
    was_training = model.training
    model.eval()
    try:
        value, _ = top_hessian_eigenvalue(lambda: model(input_ids=batch, labels=batch).loss, params,
                                          iters=iters, tol=tol, seed=seed, scales=scales,
                                          method=method)
    finally:
        model.train(was_training)
    return value
