"""Choosing what to train on: n-gram importance weights, distribution-shifting selection, online skill mixtures.

Three families of methods, each over plain lists of texts or arrays of embeddings, so they work for any corpus and
any model:

* **Target matching by n-gram importance weights** (DSIR, Xie et al. 2023). Fit a bag of hashed word n-grams to the
  target sample and to a reference (by default the candidate pool); a document's log importance weight is the sum
  over its n-grams of ``log p_target(g) - log p_reference(g)``. :func:`importance_weights`, then
  :func:`gumbel_top_k` samples ``k`` documents without replacement in proportion to the weights. The same weights
  against a clean reference make a *quality filter* (GPT-3's classifier, in its simplest form): bigrams see word
  order, unigrams do not.
* **Distribution-shifting selection** (GOT-D, Kang et al. 2024). Pre-fine-tuning data should move the distribution the
  model has *already* seen towards the target, not resemble the target. With entropic optimal transport between the
  pre-training sample and the target (:func:`sinkhorn`), the first-order change of the OT distance when a little mass
  is added at a candidate ``x`` is the dual potential ``f(x)`` (minus a constant): :func:`shift_scores`; the
  candidates with the lowest scores fill the parts of the target that pre-training left empty.
  :func:`select_distribution_shift` takes the ``k`` lowest (in one shot, as GOT-D, or in greedy rounds).
  :func:`match_scores` is the target-matching counterpart in the same embeddings: a soft distance to the target
  that ignores what pre-training saw.
* **Online skill mixtures** (Skill-it, Chen et al. 2023). :func:`skill_graph` turns short single-skill runs into the
  relative loss drops ``[i, j]`` (how much training on skill ``i`` lowers skill ``j``'s validation loss);
  :func:`graph_edges` makes them the graph ``A`` Skill-it's code uses (1 on the diagonal, 0.5 on an edge);
  :func:`skill_it_weights` is the online rule ``p_i ∝ exp(eta Σ_τ Σ_j A_ij L_j(τ))`` over the last ``window``
  rounds of validation losses; :func:`mixture_counts` turns weights into whole examples.
"""
from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch


# --- n-gram importance weights (DSIR) ------------------------------------------------------------------------
def hashed_ngrams(text: str, *, n: int = 2, buckets: int = 1 << 16) -> np.ndarray:
    """Bucket ids of the word 1..n-grams of ``text`` (whitespace words; crc32, the same in every process —
    Python's ``hash`` is salted per process)."""
    if n < 1 or buckets < 1:
        raise ValueError(f"n and buckets must be positive, got n={n}, buckets={buckets}")
    words = text.split()
    grams = [" ".join(words[i:i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1)]
    return np.fromiter((zlib.crc32(g.encode()) % buckets for g in grams), dtype=np.int64, count=len(grams))


def ngram_counts(texts: Sequence[str], *, n: int = 2, buckets: int = 1 << 16) -> np.ndarray:
    """Counts of the hashed word 1..n-grams of all ``texts``, one per bucket."""
    ids = np.concatenate([hashed_ngrams(t, n=n, buckets=buckets) for t in texts] + [np.zeros(0, np.int64)])
    return np.bincount(ids, minlength=buckets).astype(np.float64)


def ngram_log_probs(texts: Sequence[str], *, n: int = 2, buckets: int = 1 << 16, prior=None,
                    strength: float = 1.0) -> np.ndarray:
    """Log-probability of each n-gram bucket in ``texts``, smoothed towards ``prior`` (a probability per bucket;
    uniform by default) with ``strength`` pseudo-counts per bucket (uniform prior: add-one smoothing) — or, with a
    ``prior``, ``strength`` pseudo-counts in all (Dirichlet smoothing, as language-model retrieval does)."""
    if not len(texts):
        raise ValueError("cannot fit an n-gram model to no texts")
    counts = ngram_counts(texts, n=n, buckets=buckets)
    pseudo = np.full(buckets, strength) if prior is None else strength * np.asarray(prior, dtype=np.float64)
    smoothed = counts + pseudo
    return np.log(smoothed / smoothed.sum())


def importance_weights(texts: Sequence[str], target: Sequence[str], reference: Sequence[str] | None = None, *,
                       n: int = 2, buckets: int = 1 << 12, per_ngram: bool = False) -> np.ndarray:
    """Log importance weight of each text: ``Σ_g log p_target(g) − log p_reference(g)`` over its n-grams.

    ``reference`` defaults to ``texts`` themselves (DSIR: the raw pool). The reference model is add-one smoothed;
    the target model — usually the smaller sample — is smoothed *towards the reference* (Dirichlet, with as many
    pseudo-counts as the target has n-grams), so an n-gram the target never shows counts against a text instead of
    for it. ``per_ngram`` divides by the number of n-grams (a length-free score)."""
    reference_log = ngram_log_probs(texts if reference is None else reference, n=n, buckets=buckets)
    target_size = ngram_counts(target, n=n, buckets=buckets).sum()
    ratio = ngram_log_probs(target, n=n, buckets=buckets, prior=np.exp(reference_log),
                            strength=max(1.0, target_size)) - reference_log
    out = np.zeros(len(texts))
    for i, text in enumerate(texts):
        ids = hashed_ngrams(text, n=n, buckets=buckets)
        if len(ids):
            out[i] = ratio[ids].mean() if per_ngram else ratio[ids].sum()
    return out


def gumbel_top_k(log_weights, k: int, *, seed: int) -> np.ndarray:
    """``k`` indices drawn without replacement with probability ∝ ``exp(log_weights)`` (the Gumbel top-k trick,
    as DSIR resamples)."""
    log_weights = np.asarray(log_weights, dtype=np.float64)
    if not 0 <= k <= len(log_weights):
        raise ValueError(f"k must lie in [0, {len(log_weights)}], got {k}")
    keys = log_weights + np.random.default_rng(seed).gumbel(size=len(log_weights))
    return np.argsort(-keys, kind="stable")[:k]


# --- optimal transport (GOT-D) -------------------------------------------------------------------------------
def _as_points(x) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float64)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"points must be a non-empty 2-D array (rows = points), got shape {tuple(x.shape)}")
    return x


def squared_distances(x, y) -> torch.Tensor:
    """Cost matrix ``|x_i − y_j|²`` (float64)."""
    x, y = _as_points(x), _as_points(y)
    return (torch.cdist(x, y) ** 2).clamp_min(0)


def _uniform(n: int) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


def _log_weights(w, n: int) -> torch.Tensor:
    w = _uniform(n) if w is None else torch.as_tensor(w, dtype=torch.float64)
    if w.shape != (n,) or (w < 0).any() or not torch.isclose(w.sum(), torch.tensor(1.0, dtype=torch.float64)):
        raise ValueError(f"weights must be {n} non-negative numbers summing to 1")
    return w.log()


def sinkhorn(cost, a=None, b=None, *, eps: float, iters: int = 5000, tol: float = 1e-7):
    """Dual potentials ``(f, g)`` of entropic OT between ``a`` (rows of ``cost``) and ``b`` (columns), both uniform
    by default, by log-domain Sinkhorn iterations. At convergence ``OT_eps = <a, f> + <b, g>`` and the plan is
    ``a_i b_j exp((f_i + g_j − C_ij) / eps)``."""
    cost = torch.as_tensor(cost, dtype=torch.float64)
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    log_a, log_b = _log_weights(a, cost.shape[0]), _log_weights(b, cost.shape[1])
    f = torch.zeros(cost.shape[0], dtype=torch.float64)
    g = torch.zeros(cost.shape[1], dtype=torch.float64)
    for step in range(iters):
        f = -eps * torch.logsumexp((g[None, :] - cost) / eps + log_b[None, :], dim=1)
        g = -eps * torch.logsumexp((f[:, None] - cost) / eps + log_a[:, None], dim=0)
        # after the g step the column marginals are exact; the row marginals measure convergence
        if step % 10 == 9:
            rows = torch.logsumexp((f[:, None] + g[None, :] - cost) / eps + log_b[None, :], dim=1)
            if (rows.exp() - 1).abs().max() < tol:
                break
    return f, g


def transport_plan(cost, f, g, a=None, b=None, *, eps: float) -> torch.Tensor:
    cost = torch.as_tensor(cost, dtype=torch.float64)
    log_a, log_b = _log_weights(a, cost.shape[0]), _log_weights(b, cost.shape[1])
    return torch.exp((f[:, None] + g[None, :] - cost) / eps + log_a[:, None] + log_b[None, :])


def ot_distance(x, y, *, eps: float, a=None, b=None) -> float:
    """Entropic OT distance between the point clouds ``x`` and ``y`` (squared Euclidean cost; ``eps`` absolute)."""
    cost = squared_distances(x, y)
    f, g = sinkhorn(cost, a, b, eps=eps)
    wa = _uniform(len(f)) if a is None else torch.as_tensor(a, dtype=torch.float64)
    wb = _uniform(len(g)) if b is None else torch.as_tensor(b, dtype=torch.float64)
    return float(wa @ f + wb @ g)


def whitening(*clouds, shrink: float = 1e-3):
    """A map that centres points and whitens them (ZCA, fitted on all ``clouds`` together), then scales each to unit
    length. Distances in raw hidden states are dominated by the few directions every text shares (here: the question
    form); whitening gives every direction the same variance, so content can count (TAROT, arXiv 2412.00420, whitens
    features before its OT selection for the same reason). ``shrink`` adds that share of the largest variance to
    every variance."""
    points = torch.cat([_as_points(c) for c in clouds])
    mean = points.mean(0)
    values, vectors = torch.linalg.eigh(torch.cov((points - mean).T))
    transform = vectors @ torch.diag((values.clamp_min(0) + shrink * values.max()).rsqrt()) @ vectors.T

    def apply(x) -> torch.Tensor:
        return torch.nn.functional.normalize((_as_points(x) - mean) @ transform, dim=1)

    return apply


def median_cost(x, y) -> float:
    """The median squared distance between ``x`` and ``y``: the scale ``eps`` is given in (as a share of it)."""
    return float(squared_distances(x, y).median())


def soft_c_transform(cost_to_target, g, *, eps: float, b=None) -> torch.Tensor:
    """``f(x) = −eps log Σ_j b_j exp((g_j − C(x, y_j)) / eps)``: the source potential at any point ``x`` given the
    target potential ``g`` (the Sinkhorn update, evaluated at new points)."""
    cost = torch.as_tensor(cost_to_target, dtype=torch.float64)
    log_b = _log_weights(b, cost.shape[1])
    return -eps * torch.logsumexp((g[None, :] - cost) / eps + log_b[None, :], dim=1)


def shift_scores(candidates, target, reference, *, eps: float = 0.05) -> np.ndarray:
    """How much adding a little mass at each candidate changes ``OT(reference, target)``: the dual potential at the
    candidate minus its mean over the reference (the first variation of entropic OT). Negative = the candidate moves
    the reference towards the target; the most negative fill the parts of the target the reference lacks.
    ``eps`` is a share of the median reference-to-target cost."""
    candidates, target, reference = _as_points(candidates), _as_points(target), _as_points(reference)
    cost_rt = squared_distances(reference, target)
    blur = eps * float(cost_rt.median())
    f, g = sinkhorn(cost_rt, eps=blur)
    f_candidates = soft_c_transform(squared_distances(candidates, target), g, eps=blur)
    return (f_candidates - f.mean()).numpy()


def match_scores(candidates, target, *, eps: float = 0.05) -> np.ndarray:
    """A soft nearest distance from each candidate to the target sample, ``−eps log mean_j exp(−C(x, y_j) / eps)``
    (:func:`soft_c_transform` with ``g = 0``): target matching in the same embeddings, blind to what the model has
    seen. Lower = more like the target. ``eps`` is a share of the median candidate-to-target cost."""
    cost = squared_distances(candidates, target)
    blur = eps * float(cost.median())
    return soft_c_transform(cost, torch.zeros(cost.shape[1], dtype=torch.float64), eps=blur).numpy()


def select_distribution_shift(candidates, target, reference, k: int, *, eps: float = 0.05,
                              rounds: int = 1) -> np.ndarray:
    """Indices of ``k`` candidates that move ``reference ∪ selected`` towards ``target``: the lowest
    :func:`shift_scores`, taken in ``rounds`` equal parts, each round scored against the reference plus what is
    already selected (``rounds=1``: GOT-D's one-shot selection)."""
    candidates, reference = _as_points(candidates), _as_points(reference)
    if not 0 <= k <= len(candidates):
        raise ValueError(f"k must lie in [0, {len(candidates)}], got {k}")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    chosen: list[int] = []
    for r in range(rounds):
        source = torch.cat([reference, candidates[chosen]]) if chosen else reference
        scores = shift_scores(candidates, target, source, eps=eps)
        scores[chosen] = np.inf
        take = k * (r + 1) // rounds - len(chosen)
        chosen += [int(i) for i in np.argsort(scores, kind="stable")[:take]]
    return np.array(chosen, dtype=int)


# --- online skill mixtures (Skill-it) -------------------------------------------------------------------------
def skill_graph(loss_before: Sequence[float], loss_after) -> np.ndarray:
    """``A[i, j] = (L_j(base) − L_j(after training on skill i alone)) / L_j(base)``: the relative drop of skill
    ``j``'s validation loss after a short run on skill ``i`` (Skill-it's brute-force graph; negative = harm)."""
    before = np.asarray(loss_before, dtype=np.float64)
    after = np.asarray(loss_after, dtype=np.float64)
    if before.ndim != 1 or after.ndim != 2 or after.shape[1] != len(before):
        raise ValueError(f"loss_after must be (training skills x {len(before)} evaluation skills), "
                         f"got shape {after.shape}")
    if (before <= 0).any():
        raise ValueError("losses before training must be positive")
    return (before[None, :] - after) / before[None, :]


def graph_edges(relative_drop, *, threshold: float = 0.05, off_diagonal: float = 0.5) -> np.ndarray:
    """The skill graph as Skill-it's code runs it: 1 on the diagonal, ``off_diagonal`` (0.5 in the paper's code) where
    training on skill ``i`` lowered skill ``j``'s loss by more than ``threshold`` (relative), 0 elsewhere — so a skill
    that *hurts* another gives it no weight, and the sizes of the measured drops do not matter."""
    drop = np.asarray(relative_drop, dtype=np.float64)
    if drop.ndim != 2 or drop.shape[0] != drop.shape[1]:
        raise ValueError(f"relative_drop must be a square (skills x skills) array, got shape {drop.shape}")
    graph = np.where(drop > threshold, off_diagonal, 0.0)
    np.fill_diagonal(graph, 1.0)
    return graph


def skill_it_weights(graph, losses=None, *, eta: float, window: int = 3) -> np.ndarray:
    """Skill-it's online mixture: ``p_i ∝ exp(eta Σ_{τ in the last window rounds} Σ_j A_ij L_j(τ))``.

    ``losses`` is the list of per-skill validation losses observed so far, one row per round (none yet: the
    first round's rule ``p_i ∝ exp(eta Σ_j A_ij)``). A skill gets weight when it, or the skills it helps, still
    have high loss."""
    graph = np.asarray(graph, dtype=np.float64)
    if graph.ndim != 2:
        raise ValueError(f"graph must be a 2-D array, got shape {graph.shape}")
    if window < 1 or eta < 0:
        raise ValueError(f"window must be >= 1 and eta >= 0, got window={window}, eta={eta}")
    history = np.ones((1, graph.shape[1])) if losses is None or not len(losses) else np.atleast_2d(losses)
    if history.shape[1] != graph.shape[1]:
        raise ValueError(f"losses have {history.shape[1]} skills, the graph {graph.shape[1]}")
    z = eta * graph @ history[-window:].sum(0)
    p = np.exp(z - z.max())
    return p / p.sum()


def mixture_counts(weights, total: int) -> np.ndarray:
    """Whole numbers of examples per skill summing to ``total``, as close to ``weights * total`` as possible
    (largest remainders; deterministic)."""
    w = np.asarray(weights, dtype=np.float64)
    if (w < 0).any() or w.sum() <= 0 or total < 0:
        raise ValueError("weights must be non-negative with a positive sum, total >= 0")
    exact = w / w.sum() * total
    counts = np.floor(exact).astype(int)
    short = total - counts.sum()
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts
