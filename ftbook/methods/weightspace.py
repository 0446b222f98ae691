"""Weight-space analysis of a fine-tune: how big, how high-rank, and how foreign its update is.

* :func:`effective_rank` — how many singular values of a weight update hold ``energy`` (90 %) of its squared norm
  (Biderman et al. 2024: full fine-tuning's updates are 10–100× higher-rank than LoRA's);
* :func:`intruder_dimensions` — singular vectors of a fine-tuned matrix, among its top ``top_k``, whose largest
  cosine similarity to *every* singular vector of the pre-trained matrix is below ``threshold`` (Shuttleworth et
  al. 2024: LoRA introduces them, full fine-tuning does not);
* :func:`adapted_weights` reads the matrices a LoRA adapter touches (merged, for a peft model), so full fine-tuning
  and LoRA are compared on the same matrices; :func:`update_report` tabulates all three per matrix.
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..modeling import LLAMA_LINEAR_LAYERS


def singular_values(matrix) -> np.ndarray:
    """Singular values of a 2-D tensor/array, largest first (float64; a tensor already on a GPU: computed there).

    torch, not numpy: torch keeps to the one thread a chapter sets; numpy's BLAS starts one per core and, on a
    shared 2-core machine, ran 20x slower."""
    if isinstance(matrix, torch.Tensor) and matrix.device.type != "cpu":
        return torch.linalg.svdvals(matrix.float()).double().cpu().numpy()
    return torch.linalg.svdvals(_as_tensor(matrix)).numpy()


def effective_rank(delta, energy: float = 0.9) -> int:
    """How many of the largest singular values of ``delta`` hold ``energy`` of its squared Frobenius norm.

    A rank-r update has effective rank <= r at any energy; 0 for an all-zero matrix.
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must lie in (0, 1], got {energy}")
    s2 = singular_values(delta) ** 2
    total = s2.sum()
    if total <= 0:
        return 0
    # the small tolerance keeps exact cases (energy=1, equal singular values) from tipping one rank over
    return int(np.searchsorted(np.cumsum(s2) / total, energy - 1e-12) + 1)


def left_singular_vectors(matrix, *, side: str = "left", device=None) -> torch.Tensor:
    """The singular vectors of a pre-trained matrix that :func:`intruder_dimensions` compares against — worth
    computing once per base matrix (:func:`base_spectra`) rather than once per fine-tune."""
    w = _as_tensor(matrix, device)
    return torch.linalg.svd(w.T if side == "right" else w, full_matrices=False)[0]


def base_spectra(base: Mapping[str, torch.Tensor], *, device=None) -> dict[str, torch.Tensor]:
    """:func:`left_singular_vectors` of every matrix of ``base`` (pass to :func:`update_report` as ``base_svd``)."""
    return {name: left_singular_vectors(w, device=device) for name, w in base.items()}


def intruder_dimensions(pretrained, finetuned, *, top_k: int = 10, threshold: float = 0.5,
                        side: str = "left", pretrained_u: torch.Tensor | None = None, device=None) -> int:
    """Intruder dimensions of a fine-tuned matrix (Shuttleworth et al. 2024).

    Among the ``top_k`` singular vectors of ``finetuned`` (by singular value), count those whose largest absolute
    cosine similarity to every singular vector of ``pretrained`` is below ``threshold``: directions the
    fine-tune introduced that the pre-trained matrix has no counterpart for. ``side`` picks the left
    (output-space, the paper's choice) or right singular vectors. ``pretrained_u``: the pre-trained matrix's
    singular vectors if already computed (:func:`base_spectra`). ``device``: None computes in float64 on the CPU
    (the book's default); a device (a GPU, for matrices thousands wide) computes there in float32.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    w0, w1 = _as_tensor(pretrained, device), _as_tensor(finetuned, device)
    if w0.shape != w1.shape:
        raise ValueError(f"shapes differ: {tuple(w0.shape)} vs {tuple(w1.shape)}")
    if side == "right":
        w1 = w1.T
    u0 = pretrained_u.to(w1) if pretrained_u is not None else left_singular_vectors(w0, side=side, device=device)
    u1 = torch.linalg.svd(w1, full_matrices=False)[0][:, :top_k]
    best = (u1.T @ u0).abs().max(dim=1).values
    return int((best < threshold).sum())


def _as_tensor(x, device=None) -> torch.Tensor:
    """float64 on the CPU (default), or float32 on ``device``."""
    if device is not None:
        return torch.as_tensor(x if isinstance(x, torch.Tensor) else np.asarray(x)).detach().to(device, torch.float32)
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float64).cpu()
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def adapted_weights(model, targets: Sequence[str] = LLAMA_LINEAR_LAYERS) -> dict[str, torch.Tensor]:
    """The weight matrices of the ``targets`` linear layers, by a name shared by plain and peft models.

    For a peft (LoRA) model the weights are the merged ones, W + (alpha / r) B A, read from a copy (the model is
    left as it is); names lose peft's ``base_model.model.`` prefix and ``.base_layer`` infix, so a base model's
    and its fine-tunes' dictionaries line up key for key.
    """
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    out = {}
    for name, module in model.named_modules():
        if name.split(".")[-1] in targets and isinstance(module, torch.nn.Linear):
            out[name.removeprefix("base_model.model.")] = module.weight.detach().float().cpu().clone()
    if not out:
        raise ValueError(f"the model has no linear layers named {', '.join(targets)}")
    return out


def update_report(base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], *, energy: float = 0.9,
                  top_k: int = 10, threshold: float = 0.5, base_svd: Mapping[str, torch.Tensor] | None = None,
                  device=None):
    """Per matrix: effective rank of the update ``tuned - base``, its norm relative to the base, intruders.

    Returns a ``pandas.DataFrame`` with ``matrix``, ``effective_rank``, ``relative_update`` and
    ``intruders`` (see :func:`effective_rank`, :func:`intruder_dimensions`). ``base_svd``: the base matrices'
    singular vectors (:func:`base_spectra`), computed once for every report against the same base. ``device``:
    where the decompositions run (None: float64 on the CPU; a GPU: float32 there, for matrices thousands wide).
    """
    import pandas as pd

    missing = sorted(set(base) ^ set(tuned))
    if missing:
        raise ValueError(f"the two weight sets differ in matrices: {missing[:3]}")
    rows = []
    for name in sorted(base):
        delta = tuned[name] - base[name]
        rank = effective_rank(delta, energy) if device is None else effective_rank(_as_tensor(delta, device), energy)
        rows.append({"matrix": name, "effective_rank": rank,
                     "relative_update": float(delta.norm() / base[name].norm()),
                     "intruders": intruder_dimensions(base[name], tuned[name], top_k=top_k, threshold=threshold,
                                                      pretrained_u=None if base_svd is None else base_svd[name],
                                                      device=device)})
    return pd.DataFrame(rows)
