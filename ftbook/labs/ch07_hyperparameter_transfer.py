"""Chapter 7's experiment: learning-rate sweeps across width, in the standard and the maximal-update
parametrisation, with the sharpness and attention-logit measurements of the instability proxies.

The model and muP's rules are :mod:`ftbook.methods.mup`; the Hessian's top eigenvalue is
:mod:`ftbook.methods.curvature`. A sweep is one :class:`RunSpec` per (parametrisation, width, learning rate),
each trained by :func:`ftbook.train.train` in :func:`train_point`, side by side in worker processes
(:func:`run_sweep`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ..methods import curvature
from ..methods.mup import make_model, param_groups


# --- sweeps: one training run per (parametrisation, width, learning rate) ---------------------------
@dataclass(frozen=True)
class RunSpec:
    """One point of a sweep. ``sharpness_steps``: steps at which to measure the top Hessian eigenvalue
    (0 = at initialisation); ``log_every``: steps between loss / attention-logit records."""
    parametrization: str
    width: int
    lr: float
    steps: int = 100
    batch_size: int = 16
    warmup_steps: int = 10
    seed: int = 0
    qk_norm: bool = False
    z_loss: float = 0.0            # weight of Wortsman et al.'s z-loss: z_loss · log²Z of the output normaliser Z
    base_width: int = 32
    n_layer: int = 2
    n_head: int = 4
    sharpness_steps: tuple[int, ...] = ()
    sharpness_iters: int = 20
    log_every: int = 5
    device: str = "cpu"
    precision: str = "fp32"


def train_point(spec: RunSpec, train_ids: np.ndarray, val_ids: np.ndarray, *, progress: bool = False) -> dict:
    """Train one model of ``spec`` with :func:`ftbook.train.train` (muP learning rates through its
    ``param_groups`` hook; warmup then cosine, no weight decay) and measure it.

    Returns a JSON-ready dict: the spec, ``val_loss`` (``inf`` when training diverged to a non-finite
    loss), ``curve`` (rows of step, train loss, largest attention logit) and ``sharpness``
    (rows of step, top eigenvalue of the loss Hessian on a fixed validation batch of 8 sequences).
    """
    from dataclasses import asdict

    from ..train import TrainConfig, train

    train_ids, val_ids = np.asarray(train_ids), np.asarray(val_ids)
    model = make_model(int(max(train_ids.max(), val_ids.max())) + 1, spec.width, spec.parametrization,
                       seed=spec.seed, seq_len=train_ids.shape[1], qk_norm=spec.qk_norm,
                       base_width=spec.base_width, n_layer=spec.n_layer, n_head=spec.n_head)
    hessian_batch = torch.as_tensor(val_ids[:8])
    logits, sharpness = {}, []

    def measure(step, m):
        logits[step] = m.max_attention_logit()
        if step in spec.sharpness_steps:
            value = curvature.model_sharpness(m, hessian_batch.to(next(m.parameters()).device),
                                              iters=spec.sharpness_iters, tol=1e-3, seed=spec.seed)
            sharpness.append({"step": step, "sharpness": value})

    if 0 in spec.sharpness_steps:
        measure(0, model)
    cfg = TrainConfig(steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size, warmup_steps=spec.warmup_steps,
                      schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0, log_every=spec.log_every,
                      seed=spec.seed, device=spec.device, precision=spec.precision, progress=progress,
                      desc=f"{spec.parametrization} w={spec.width} lr={spec.lr:.3g}")
    import datasets

    history = train(model, datasets.Dataset.from_dict({"input_ids": train_ids}), cfg,
                    eval_data={"val": datasets.Dataset.from_dict({"input_ids": val_ids})},
                    on_step=measure, param_groups=param_groups,
                    loss_fn=partial(loss_with_z_loss, weight=spec.z_loss) if spec.z_loss else None)
    final = history.iloc[-1]
    val = final.get("eval/val")
    val_loss = float(val) if val is not None and np.isfinite(val) else math.inf
    curve = [{"step": int(r.step), "train_loss": float(r.train_loss), "max_logit": logits.get(int(r.step))}
             for r in history.itertuples() if r.step > 0 and r.train_loss == r.train_loss]
    return {**asdict(spec), "val_loss": val_loss, "diverged": not math.isfinite(val_loss),
            "curve": curve, "sharpness": sharpness}


def loss_with_z_loss(model, batch, *, weight: float) -> torch.Tensor:
    """Next-token cross-entropy plus Wortsman et al.'s z-loss, ``weight · mean(log²Z)`` with ``Z`` the softmax
    normaliser of the output logits: it keeps the output logits from drifting (their "output logit divergence")."""
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return ce + weight * torch.logsumexp(logits, dim=-1).pow(2).mean()


def lr_sensitivity(losses: Sequence[float], *, init_loss: float) -> float:
    """Wortsman et al.'s learning-rate sensitivity over a grid: the mean, over the learning rates, of how far the
    final loss is above the best one, each loss capped at the loss at initialisation (a diverged run counts as no
    better than not training): ``E_η[min(ℓ(η), ℓ0) − min_η ℓ(η)]``. 0 = every learning rate of the grid as good as the
    best."""
    capped = np.minimum(np.asarray(losses, dtype=float), init_loss)
    return float(np.mean(capped - capped.min()))


def _store_tokens(train_ids, val_ids) -> None:
    from ..parallel import worker_state

    worker_state().update(train=train_ids, val=val_ids)


def _run_stored(spec: RunSpec) -> dict:
    from ..parallel import worker_state

    return train_point(spec, worker_state()["train"], worker_state()["val"])


def run_sweep(specs: Sequence[RunSpec], train_ids, val_ids, *, workers: int = 1, progress: bool = True,
              desc: str = "sweep") -> list[dict]:
    """Run every spec; with ``workers > 1`` in that many single-thread processes (each run is small:
    two processes of one thread beat one process of two threads on a 2-core machine). Results come
    back in the order of ``specs``, identical whatever ``workers`` is (each run is seeded)."""
    from ..parallel import run_jobs

    specs = list(specs)
    # the token arrays go to each worker once (initializer), not once per run
    return run_jobs([partial(_run_stored, spec) for spec in specs], workers=workers,
                    cost=[spec.width * spec.steps for spec in specs], initializer=_store_tokens,
                    initargs=(np.asarray(train_ids), np.asarray(val_ids)), progress=progress, desc=desc)


def best_lr(results: Sequence[dict], parametrization: str, width: int) -> float:
    """The grid learning rate with the lowest validation loss (diverged runs count as infinite)."""
    rows = [r for r in results if r["parametrization"] == parametrization and r["width"] == width
            and not r["qk_norm"] and not r.get("z_loss")]
    return min(rows, key=lambda r: (r["val_loss"], r["lr"]))["lr"]


def optimum_position(results: Sequence[dict], parametrization: str, width: int, grid: Sequence[float]) -> float:
    """Where the loss-optimal learning rate lies on ``grid``, in grid steps and between grid points: the index of the
    best grid point plus the vertex of the parabola through it and its two neighbours (validation loss against
    log lr). The vertex lies within half a step of the best point. At the grid's edge, or next to a diverged run, the
    best point's index is all there is."""
    grid = sorted(grid)
    rows = {r["lr"]: r["val_loss"] for r in results if r["parametrization"] == parametrization
            and r["width"] == width and not r["qk_norm"] and not r.get("z_loss")}
    i = grid.index(nearest(grid, best_lr(results, parametrization, width)))
    if not 0 < i < len(grid) - 1:
        return float(i)
    below, at, above = (rows.get(grid[k], math.inf) for k in (i - 1, i, i + 1))
    bend = below - 2 * at + above
    if not (math.isfinite(below) and math.isfinite(above)) or bend <= 0:
        return float(i)
    # a factor-2 grid is uniform in log lr, so the three points are one step apart
    return i + 0.5 * (below - above) / bend


def optimum_shift(results: Sequence[dict], parametrization: str, widths: Sequence[int],
                  grid: Sequence[float]) -> float:
    """How many grid steps the loss-optimal learning rate spans across ``widths`` (largest position − smallest, each
    from :func:`optimum_position`: a near-tie between two neighbouring grid points moves it by a fraction of a step,
    not by a whole one)."""
    positions = [optimum_position(results, parametrization, w, grid) for w in widths]
    return max(positions) - min(positions)


def lr_grid(lr_min: float, points: int) -> list[float]:
    """``lr_min · 2^k`` for ``k = 0 … points−1`` (a factor-2 grid, as in Yang et al.'s sweeps)."""
    return [lr_min * 2 ** k for k in range(points)]


def nearest(grid: Sequence[float], value: float) -> float:
    """The grid point closest to ``value`` in log scale."""
    return min(grid, key=lambda g: abs(math.log(g / value)))


def corpus_blocks(corpus: str, seed: int, *, n_docs: int, vocab_size: int, seq_len: int,
                  val_blocks: int = 128):
    """Token blocks for the sweep: ``(train_ids, val_ids, tokenizer)`` as int64 arrays ``[n, seq_len]``.

    ``corpus``: ``"world"`` (the book's synthetic corpus of this seed), an :mod:`ftbook.corpora` name, or a
    hub dataset ``hf:org/name@config`` (``gpu`` profile). A BPE tokenizer of ``vocab_size`` is trained on the
    training documents (cached by their hash).
    """
    from .. import data as D

    if corpus == "world":
        from .. import zoo

        docs = zoo.corpus(zoo.recipe("base", n_docs=int(n_docs / 0.95) + 1), seed)
        train_texts, val_texts = docs["train"][:n_docs], docs["val/world"]
    elif corpus.startswith("hf:"):
        from .. import hub

        train_texts = hub.texts(corpus, "train", max_docs=n_docs)
        val_texts = hub.texts(corpus, "validation", max_docs=max(200, n_docs // 20))
    else:
        from .. import corpora

        train_texts, val_texts = corpora.texts(corpus, "train")[:n_docs], corpora.texts(corpus, "validation")
    tokenizer = D.train_tokenizer(train_texts, vocab_size=vocab_size)
    train_ids = np.asarray(D.pack(train_texts, tokenizer, seq_len)["input_ids"])
    val_ids = np.asarray(D.pack(val_texts, tokenizer, seq_len)["input_ids"])[:val_blocks]
    return train_ids, val_ids, tokenizer


def frames(results: Sequence[dict]):
    """Three tables from sweep results: one row per run (``runs``), the training curves (``curves``:
    step, train_loss, max_logit) and the sharpness measurements (``sharpness``)."""
    import pandas as pd

    keys = ("parametrization", "width", "lr", "qk_norm", "z_loss", "seed")
    runs = pd.DataFrame([{k: r[k] for k in (*keys, "val_loss", "diverged")} for r in results])
    curves = pd.DataFrame([{**{k: r[k] for k in keys}, **row} for r in results for row in r["curve"]])
    sharp = pd.DataFrame([{**{k: r[k] for k in keys}, **row} for r in results for row in r["sharpness"]])
    return runs, curves, sharp


def width_spread(values: Sequence[float]) -> float:
    """Coefficient of variation (std / |mean|) of one quantity across widths: 0 = width-independent."""
    v = np.asarray(values, dtype=float)
    return float(v.std() / max(abs(v.mean()), 1e-12))
