import itertools

import numpy as np
import pytest
import torch

from ftbook.methods import data_selection as S

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- n-gram importance weights ---------------------------------------------------------------------------------
def test_hashed_ngrams_are_stable_and_count_every_ngram():
    ids = S.hashed_ngrams("the cat sat down", n=2, buckets=1 << 16)
    assert len(ids) == 4 + 3 and ids.min() >= 0 and ids.max() < 1 << 16
    assert np.array_equal(ids, S.hashed_ngrams("the cat sat down", n=2, buckets=1 << 16))
    assert len(S.hashed_ngrams("the cat sat down", n=1)) == 4
    assert len(S.hashed_ngrams("", n=2)) == 0
    with pytest.raises(ValueError):
        S.hashed_ngrams("a b", n=0)


def test_ngram_log_probs_are_a_distribution_and_smoothing_keeps_unseen_buckets_possible():
    logp = S.ngram_log_probs(["a b c", "a b"], n=2, buckets=64)
    assert np.isclose(np.exp(logp).sum(), 1) and np.isfinite(logp).all()
    prior = np.exp(S.ngram_log_probs(["x y z"] * 5, n=1, buckets=64))
    towards = S.ngram_log_probs(["a"], n=1, buckets=64, prior=prior, strength=100)
    assert np.isclose(np.exp(towards).sum(), 1)
    # with a strong prior, the buckets the prior favours keep most of the mass
    assert towards[S.hashed_ngrams("x", n=1, buckets=64)[0]] > towards[S.hashed_ngrams("q", n=1, buckets=64)[0]]


def test_importance_weights_rank_target_like_text_first():
    target = ["q : where does kalo live ? a : paris ."] * 3 + ["q : what pet does mira have ? a : cat ."] * 3
    pool = ["the list 1 2 3 has 3 numbers .", "q : where does lumo live ? a : oslo .", "after 4 comes 5 ."] * 5
    w = S.importance_weights(pool, target)
    assert w[1] > w[0] and w[1] > w[2]
    # the same texts give the same weights; per_ngram removes the length effect
    assert np.allclose(w, S.importance_weights(pool, target))
    long, short = "q : where does kalo live ? a : paris . " * 3, "q : where does kalo live ? a : paris ."
    per = S.importance_weights([long.strip(), short], target, pool, per_ngram=True)
    assert abs(per[0] - per[1]) < 0.2 * abs(per[1])


def test_gumbel_top_k_is_seeded_distinct_and_follows_the_weights():
    logw = np.log(np.array([100.0, 1.0, 1.0, 1.0, 1.0]))
    picks = [S.gumbel_top_k(logw, 1, seed=s)[0] for s in range(200)]
    assert np.mean(np.array(picks) == 0) > 0.9
    a = S.gumbel_top_k(np.zeros(50), 10, seed=3)
    assert len(set(a.tolist())) == 10 and np.array_equal(a, S.gumbel_top_k(np.zeros(50), 10, seed=3))
    with pytest.raises(ValueError):
        S.gumbel_top_k(np.zeros(3), 4, seed=0)


# --- optimal transport ------------------------------------------------------------------------------------------
def test_sinkhorn_meets_both_marginals():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3))
    a = rng.random(7)
    a /= a.sum()
    cost = S.squared_distances(x, y)
    f, g = S.sinkhorn(cost, a, None, eps=0.1 * float(cost.median()))
    plan = S.transport_plan(cost, f, g, a, None, eps=0.1 * float(cost.median()))
    assert torch.allclose(plan.sum(1), torch.as_tensor(a), atol=1e-6)
    assert torch.allclose(plan.sum(0), torch.full((5,), 0.2, dtype=torch.float64), atol=1e-6)


def test_entropic_ot_approaches_the_exact_assignment_as_eps_shrinks():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 2)), rng.normal(size=(5, 2))
    cost = S.squared_distances(x, y).numpy()
    exact = min(np.mean([cost[i, p[i]] for i in range(5)]) for p in itertools.permutations(range(5)))
    plan_cost = []
    for eps in (0.1, 0.01):
        c = torch.as_tensor(cost)
        f, g = S.sinkhorn(c, eps=eps, iters=20000, tol=1e-5)
        plan_cost.append(float((S.transport_plan(c, f, g, eps=eps) * c).sum()))
    assert abs(plan_cost[1] - exact) < 0.05 * exact + 1e-3
    assert abs(plan_cost[1] - exact) <= abs(plan_cost[0] - exact) + 1e-9


def test_soft_c_transform_at_the_source_points_is_the_source_potential():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(4, 2))
    cost = S.squared_distances(x, y)
    f, g = S.sinkhorn(cost, eps=0.5, tol=1e-12)
    assert torch.allclose(S.soft_c_transform(cost, g, eps=0.5), f, atol=1e-6)


def _clusters(seed=0):
    """Target: half at (0, 0), half at (10, 0). Candidates: 20 near each target cluster and 20 far away."""
    rng = np.random.default_rng(seed)
    near_a = rng.normal(size=(20, 2)) * 0.3
    near_b = rng.normal(size=(20, 2)) * 0.3 + [10, 0]
    target = np.concatenate([rng.normal(size=(30, 2)) * 0.3, rng.normal(size=(30, 2)) * 0.3 + [10, 0]])
    far = rng.normal(size=(20, 2)) * 0.3 + [5, 8]
    return target, np.concatenate([near_a, near_b, far])


def test_shift_scores_prefer_the_part_of_the_target_the_reference_lacks():
    target, candidates = _clusters()
    rng = np.random.default_rng(5)
    covers_a = rng.normal(size=(40, 2)) * 0.3                                   # pre-training saw cluster A only
    scores = S.shift_scores(candidates, target, covers_a)
    assert scores[20:40].mean() < scores[:20].mean() - 1                         # B's candidates move it most
    assert scores[20:40].max() < scores[40:].min()                              # far-away ones move it least
    chosen = S.select_distribution_shift(candidates, target, covers_a, 10)
    assert set(chosen.tolist()) <= set(range(20, 40))


def test_shift_scores_lose_their_preference_when_the_reference_already_covers_both_parts():
    """The control: with a reference that saw both clusters, neither cluster's candidates are preferred — the
    preference above comes from what the reference lacks, not from the candidates' likeness to the target."""
    target, candidates = _clusters()
    rng = np.random.default_rng(6)
    covers_both = np.concatenate([rng.normal(size=(20, 2)) * 0.3, rng.normal(size=(20, 2)) * 0.3 + [10, 0]])
    scores = S.shift_scores(candidates, target, covers_both)
    assert abs(scores[20:40].mean() - scores[:20].mean()) < 0.3
    # target matching ignores the reference: it cannot tell the two clusters apart in either case
    match = S.match_scores(candidates, target)
    assert abs(match[20:40].mean() - match[:20].mean()) < 0.3 and match[40:].min() > match[:40].max()


def test_greedy_rounds_stop_taking_one_cluster_once_it_is_filled():
    target, candidates = _clusters()
    covers_a = np.random.default_rng(5).normal(size=(10, 2)) * 0.3
    one_shot = S.select_distribution_shift(candidates, target, covers_a, 30)
    greedy = S.select_distribution_shift(candidates, target, covers_a, 30, rounds=3)
    assert len(set(greedy.tolist())) == 30
    # one shot takes all of B first; greedy rounds, once B is well covered, also take from A
    assert (one_shot < 20).sum() <= (greedy < 20).sum()


def test_selection_refuses_bad_budgets():
    target, candidates = _clusters()
    with pytest.raises(ValueError):
        S.select_distribution_shift(candidates, target, target, 61)
    with pytest.raises(ValueError):
        S.select_distribution_shift(candidates, target, target, 5, rounds=0)


# --- skill mixtures ---------------------------------------------------------------------------------------------
def test_skill_graph_is_the_relative_loss_drop():
    drop = S.skill_graph([2.0, 1.0], [[1.0, 1.5], [2.0, 0.5]])
    assert np.allclose(drop, [[0.5, -0.5], [0.0, 0.5]])
    with pytest.raises(ValueError):
        S.skill_graph([2.0, 1.0], [[1.0, 1.0, 1.0]])


def test_graph_edges_keep_only_helpful_edges_at_half_weight():
    graph = S.graph_edges(np.array([[0.9, 0.3, -2.0], [0.01, 0.8, 0.2], [0.5, 0.0, 0.1]]), threshold=0.05)
    assert np.array_equal(graph, [[1, 0.5, 0], [0, 1, 0.5], [0.5, 0, 1]])


def test_skill_it_weights_favour_high_loss_skills_and_the_skills_that_help_them():
    identity = np.eye(3)
    p = S.skill_it_weights(identity, [[0.5, 1.0, 2.0]], eta=1.0)
    assert np.isclose(p.sum(), 1) and p[2] > p[1] > p[0]
    assert np.allclose(S.skill_it_weights(identity, [[0.5, 1.0, 2.0]], eta=0.0), 1 / 3)
    # skill 0 feeds the struggling skill 2: it gains weight over skill 1 with the same own loss
    graph = np.array([[1, 0, 0.5], [0, 1, 0], [0, 0, 1]], dtype=float)
    p = S.skill_it_weights(graph, [[1.0, 1.0, 3.0]], eta=1.0)
    assert p[0] > p[1]
    # no losses yet: the first round's rule exp(eta * row sums)
    assert np.allclose(S.skill_it_weights(graph, None, eta=1.0), np.exp([1.5, 1, 1]) / np.exp([1.5, 1, 1]).sum())
    # only the last `window` rounds count
    old, new = [[9.0, 0.0, 0.0]], [[0.0, 0.0, 1.0]] * 2
    assert S.skill_it_weights(identity, old + new, eta=1.0, window=2).argmax() == 2
    assert S.skill_it_weights(identity, old + new, eta=1.0, window=3).argmax() == 0


def test_mixture_counts_are_whole_and_proportional():
    counts = S.mixture_counts([0.5, 0.3, 0.2], 7)
    assert counts.sum() == 7 and list(counts) == [4, 2, 1]
    assert S.mixture_counts([1, 1, 1], 300).tolist() == [100, 100, 100]
    with pytest.raises(ValueError):
        S.mixture_counts([0, 0], 3)


def test_whitening_removes_a_dominant_shared_direction():
    """Two kinds of points differ by a little in one direction, while every point also varies a lot in a direction
    that carries no kind: raw distances barely see the kinds, whitened ones do."""
    rng = np.random.default_rng(0)
    kind = rng.integers(0, 2, 200)
    x = np.stack([rng.normal(size=200) * 10, kind * 0.5 + rng.normal(size=200) * 0.05], 1)
    white = S.whitening(x)
    z = white(x)
    assert torch.allclose(z.norm(dim=1), torch.ones(200, dtype=torch.float64))

    def separation(points):
        d = S.squared_distances(points, points)
        same = d[kind[:, None] == kind[None, :]].mean()
        return float(d[kind[:, None] != kind[None, :]].mean() / same)

    assert separation(torch.as_tensor(x)) < 1.1
    assert separation(z) > 1.5
