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
    """Singular values of a 2-D tensor/array, largest first (float64).

    torch, not numpy: torch keeps to the one thread a chapter sets; numpy's BLAS starts one per core and, on a
    shared 2-core machine, ran 20x slower."""
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


def intruder_dimensions(pretrained, finetuned, *, top_k: int = 10, threshold: float = 0.5,
                        side: str = "left") -> int:
    """Intruder dimensions of a fine-tuned matrix (Shuttleworth et al. 2024).

    Among the ``top_k`` singular vectors of ``finetuned`` (by singular value), count those whose largest absolute
    cosine similarity to every singular vector of ``pretrained`` is below ``threshold``: directions the
    fine-tune introduced that the pre-trained matrix has no counterpart for. ``side`` picks the left
    (output-space, the paper's choice) or right singular vectors.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    w0, w1 = _as_tensor(pretrained), _as_tensor(finetuned)
    if w0.shape != w1.shape:
        raise ValueError(f"shapes differ: {tuple(w0.shape)} vs {tuple(w1.shape)}")
    if side == "right":
        w0, w1 = w0.T, w1.T
    u0 = torch.linalg.svd(w0, full_matrices=False)[0]
    u1 = torch.linalg.svd(w1, full_matrices=False)[0][:, :top_k]
    best = (u1.T @ u0).abs().max(dim=1).values
    return int((best < threshold).sum())


def _as_tensor(x) -> torch.Tensor:
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
                  top_k: int = 10, threshold: float = 0.5):
    """Per matrix: effective rank of the update ``tuned - base``, its norm relative to the base, intruders.

    Returns a ``pandas.DataFrame`` with ``matrix``, ``effective_rank``, ``relative_update`` and
    ``intruders`` (see :func:`effective_rank`, :func:`intruder_dimensions`).
    """
    import pandas as pd

    missing = sorted(set(base) ^ set(tuned))
    if missing:
        raise ValueError(f"the two weight sets differ in matrices: {missing[:3]}")
    rows = []
    for name in sorted(base):
        delta = tuned[name] - base[name]
        rows.append({"matrix": name, "effective_rank": effective_rank(delta, energy),
                     "relative_update": float(delta.norm() / base[name].norm()),
                     "intruders": intruder_dimensions(base[name], tuned[name], top_k=top_k, threshold=threshold)})
    return pd.DataFrame(rows)
