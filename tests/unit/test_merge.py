"""ftbook.methods.merge: against peft.utils.merge_utils where peft has the method, and on hand-made tensors whose
answer is known."""
import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ftbook import modeling
from ftbook.methods import merge as M


def _peft_merge_utils():
    """peft's merge_utils.py loaded by itself (it needs only torch): importing the peft package would pull
    in transformers and cost seconds."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("peft")
    if spec is None:
        pytest.skip("peft is not installed")
    path = Path(spec.submodule_search_locations[0]) / "utils" / "merge_utils.py"
    module_spec = importlib.util.spec_from_file_location("_peft_merge_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


pmu = _peft_merge_utils()


def _random_state(seed, shapes=None):
    gen = torch.Generator().manual_seed(seed)
    shapes = shapes or {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (3, 4, 2)}
    return {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}


def _close(a, b, **kw):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **kw)


# --- against peft ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.9])
def test_trim_matches_peft_magnitude_pruning(density):
    tau = torch.randn(7, 9, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(M.trim(tau, density), pmu.magnitude_based_pruning(tau, density), rtol=0, atol=0)


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.7, 1.0])
def test_ties_matches_peft(sign_method, density):
    gen = torch.Generator().manual_seed(2)
    taus = [torch.randn(8, 5, generator=gen) for _ in range(3)]
    weights = [0.7, 1.3, 0.4]
    with pytest.warns(UserWarning) if density >= 1 else contextlib.nullcontext():  # peft: "nothing pruned"
        expected = pmu.ties(taus, torch.tensor(weights), density, sign_method)
    torch.testing.assert_close(M.ties_tensors(taus, weights, density, sign_method), expected)


def test_task_arithmetic_and_magnitude_prune_match_peft():
    base = _random_state(0)
    fts = [_random_state(s) for s in (1, 2, 3)]
    taus = [M.task_vector(ft, base) for ft in fts]
    weights, scaling = [1.0, -0.5, 0.25], 0.8
    merged = M.task_arithmetic(base, taus, scaling=scaling, weights=weights)
    for key in base:
        expected = base[key] + pmu.task_arithmetic([t[key] for t in taus], torch.tensor(weights) * scaling)
        torch.testing.assert_close(merged[key], expected)
    trimmed = [M.trim(t["a.weight"], 0.4) for t in taus]
    torch.testing.assert_close(M.weighted_sum(trimmed, weights),
                               pmu.magnitude_prune([t["a.weight"] for t in taus], torch.tensor(weights), 0.4))


def test_ties_merging_state_dicts_match_peft_per_key():
    base = _random_state(0)
    taus = [M.task_vector(_random_state(s), base) for s in (4, 5, 6)]
    merged = M.ties_merging(base, taus, density=0.3, scaling=0.6)
    for key in base:
        expected = base[key] + 0.6 * pmu.ties([t[key] for t in taus], torch.ones(3), 0.3)
        torch.testing.assert_close(merged[key], expected)


@pytest.mark.parametrize("then,peft_fn", [("sum", "dare_linear"), ("ties", "dare_ties")])
def test_dare_matches_peft_under_the_same_seed(then, peft_fn):
    """peft draws from the global generator; ours from a given one: the same seed gives the same masks."""
    gen = torch.Generator().manual_seed(3)
    taus = [torch.randn(10, 6, generator=gen) for _ in range(3)]
    weights, drop_rate = [1.0, 0.5, 2.0], 0.7
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        expected = getattr(pmu, peft_fn)(taus, torch.tensor(weights), 1 - drop_rate)  # peft: density = 1 − p
    ours = M.dare_tensors(taus, weights, drop_rate, torch.Generator().manual_seed(11), then=then)
    torch.testing.assert_close(ours, expected)


# --- hand-made tensors ----------------------------------------------------------------------------------
def test_ties_sign_election_by_hand():
    t1, t2 = torch.tensor([3.0, -1.0, 0.5, 2.0]), torch.tensor([-1.0, -2.0, 0.5, -3.0])
    stacked = torch.stack([t1, t2])
    assert M.elect_sign(stacked).tolist() == [1, -1, 1, -1]  # by mass: 2, -3, 1, -1
    assert M.elect_sign(torch.stack([t1, t2, t2 * 0 + 0.1])).tolist() == [1, -1, 1, -1]
    # no trimming: mean over the vectors that agree with the elected sign
    assert M.ties_tensors([t1, t2], [1.0, 1.0], 1.0).tolist() == [3.0, -1.5, 0.5, -3.0]
    # keep 50%: t1 -> [3, 0, 0, 2], t2 -> [0, -2, 0, -3]; mass [3, -2, 0, -1]; zeros vote for nobody
    assert M.ties_tensors([t1, t2], [1.0, 1.0], 0.5).tolist() == [3.0, -2.0, 0.0, -3.0]
    # "frequency": one vote per vector; 2 positives outvote one large negative
    votes = torch.stack([torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-5.0])])
    assert M.elect_sign(votes, "frequency").tolist() == [1] and M.elect_sign(votes, "total").tolist() == [-1]


def test_soup_interpolation_and_task_vectors_by_hand():
    a = {"w": torch.tensor([0.0, 2.0]), "step": torch.tensor(7)}
    b = {"w": torch.tensor([4.0, 6.0]), "step": torch.tensor(9)}
    assert M.uniform_soup([a, b])["w"].tolist() == [2.0, 4.0]
    assert M.uniform_soup([a, b])["step"].item() == 7  # integer buffers come from the first model
    assert M.average([a, b], weights=[3, 1])["w"].tolist() == [1.0, 3.0]
    assert M.interpolate(a, b, 0.0)["w"].tolist() == [0.0, 2.0]
    assert M.interpolate(a, b, 1.0)["w"].tolist() == [4.0, 6.0]
    assert M.wise_ft(a, b, 0.25)["w"].tolist() == [1.0, 3.0]
    tau = M.task_vector(b, a)
    assert tau["w"].tolist() == [4.0, 4.0] and (-tau)["w"].tolist() == [-4.0, -4.0]
    assert M.task_arithmetic(a, [tau])["w"].tolist() == [4.0, 6.0]  # base + τ = the fine-tune
    assert M.task_arithmetic(a, [M.negate(tau)], scaling=0.5)["w"].tolist() == [-2.0, 0.0]
    assert M.task_arithmetic(a, [tau, tau], weights=[1, -1])["w"].tolist() == [0.0, 2.0]
    assert M.negate(tau.materialize())["w"].tolist() == [-4.0, -4.0]


def test_half_precision_is_kept_and_tied_tensors_stay_tied():
    shared = torch.randn(4, 3)
    a = {"embed.weight": shared, "head.weight": shared, "x": torch.randn(3).bfloat16()}
    b = {"embed.weight": shared + 1, "head.weight": shared + 1, "x": torch.randn(3).bfloat16()}
    out = M.uniform_soup([a, b])
    assert out["x"].dtype == torch.bfloat16
    assert out["head.weight"] is out["embed.weight"]  # merged once, shared like in the model
    dared = M.dare(a, [M.task_vector(b, a)], drop_rate=0.5, seed=0)
    assert dared["head.weight"] is dared["embed.weight"]


def test_dare_is_deterministic_by_seed_and_unbiased():
    base = _random_state(0, {"w": (200, 100), "v": (50,)})
    tau = M.task_vector(_random_state(1, {"w": (200, 100), "v": (50,)}), base)
    one, again = (M.dare(base, [tau], drop_rate=0.9, seed=5) for _ in range(2))
    _close(one, again, rtol=0, atol=0)
    other = M.dare(base, [tau], drop_rate=0.9, seed=6)
    assert not torch.equal(one["w"], other["w"])
    # the masks of a key do not depend on which other keys exist
    only_w = M.dare({"w": base["w"]}, [{"w": tau["w"]}], drop_rate=0.9, seed=5)
    assert torch.equal(only_w["w"], one["w"])
    kept = (one["w"] != base["w"]).float().mean().item()
    assert 0.08 < kept < 0.12  # about 1 − p of the entries survive ...
    dropped = one["w"] - base["w"]
    nz = dropped != 0
    torch.testing.assert_close(dropped[nz], tau["w"][nz] * 10)  # ... rescaled by 1/(1 − p)
    assert torch.equal(M.dare(base, [tau], drop_rate=0.0, seed=0)["w"], base["w"] + tau["w"])


def test_greedy_soup_picks_by_held_out_score():
    models = [{"x": torch.tensor([1.0])}, {"x": torch.tensor([3.0])}, {"x": torch.tensor([10.0])},
              {"x": torch.tensor([2.5])}]
    calls = []

    def score(sd):  # the best weight is 2
        calls.append(sd["x"].item())
        return -float((sd["x"] - 2.0) ** 2)

    result = M.greedy_soup(models, score)
    # own scores: -1, -1, -64, -.25 -> order 3, 0, 1, 2; {3,0}: 1.75 (-.0625) ok; {3,0,1}: 2.1667 (-.028) ok;
    # {3,0,1,2}: 4.125 (-4.5) rejected
    assert result.ingredients == [3, 0, 1]
    torch.testing.assert_close(result.state_dict["x"], torch.tensor([6.5 / 3]))
    assert result.score == pytest.approx(-(6.5 / 3 - 2) ** 2)
    assert [h["accepted"] for h in result.history] == [True, True, True, False]
    assert len(calls) == 4 + 3  # every ingredient once, then every try
    assert score(M.uniform_soup(models)) < max(result.individual_scores)  # the uniform soup is worse here
    # known scores are not recomputed; a drop stops an ingredient even if later ones would be fine
    calls.clear()
    assert M.greedy_soup(models, score, individual_scores=[-1, -1, -64, -0.25]).ingredients == [3, 0, 1]
    assert len(calls) == 3


def test_fisher_merge_by_hand():
    a, b = {"w": torch.tensor([0.0, 0.0]), "n": torch.tensor(1)}, {"w": torch.tensor([4.0, 4.0]), "n": torch.tensor(2)}
    fa, fb = {"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 1.0])}
    assert M.fisher_merge([a, b], [fa, fb])["w"].tolist() == pytest.approx([3.0, 1.0])
    same = {"w": torch.tensor([2.0, 0.5])}
    assert M.fisher_merge([a, b], [same, same])["w"].tolist() == pytest.approx([2.0, 2.0])  # = the average
    zero = {"w": torch.zeros(2)}
    assert M.fisher_merge([a, b], [zero, zero])["w"].tolist() == pytest.approx([2.0, 2.0])  # floor: average
    assert M.fisher_merge([a, b], [fa, fb], weights=[1, 0])["w"].tolist() == pytest.approx([0.0, 0.0])
    assert M.fisher_merge([a, b], [fa, fb])["n"].item() == 1


def test_fisher_merge_equal_fishers_is_the_average_on_random_models():
    models = [_random_state(s) for s in (1, 2, 3)]
    fisher = {k: torch.rand_like(v) + 0.1 for k, v in models[0].items() if k != "a.bias"}  # bias: no Fisher
    _close(M.fisher_merge(models, [fisher] * 3), M.uniform_soup(models))


def test_regmean_is_least_squares_and_identical_grams_give_the_average():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(40, 5, generator=gen, dtype=torch.float64) for _ in range(3)]
    ws = [torch.randn(4, 5, generator=gen, dtype=torch.float64) for _ in range(3)]  # nn.Linear layout [out, in]
    models = [{"lin.weight": w, "lin.bias": torch.full((4,), float(i))} for i, w in enumerate(ws)]
    grams = [{"lin.weight": x.T @ x} for x in xs]
    merged = M.regmean_merge(models, grams)
    # the W that best reproduces every model's outputs on its own inputs: min Σ ||X_i Wᵀ − X_i W_iᵀ||²
    expected = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ w.T for x, w in zip(xs, ws)])).solution.T
    torch.testing.assert_close(merged["lin.weight"], expected)
    assert merged["lin.bias"].tolist() == [1.0] * 4  # no Gram: simple average
    same = [{"lin.weight": xs[0].T @ xs[0]}] * 3
    torch.testing.assert_close(M.regmean_merge(models, same)["lin.weight"], sum(ws) / 3)
    # alpha = 0 keeps only the diagonal: a per-input-feature weighted average
    diag = torch.stack([torch.diagonal(g["lin.weight"]) for g in grams])  # [model, in]
    expected0 = sum(w * d for w, d in zip(ws, diag)) / diag.sum(0)
    torch.testing.assert_close(M.regmean_merge(models, grams, alpha=0.0)["lin.weight"], expected0)


class _Tiny(nn.Module):
    """A causal "LM" with the transformers call signature: embedding, one hidden linear layer, tied head."""

    def __init__(self, vocab=11, width=6, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight  # tied

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.head(torch.tanh(self.hidden(self.embed(input_ids)))))


def _batches():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (3, 5), generator=gen)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, 3:] = 0
    labels = ids.clone()
    labels[2, :2] = -100
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels}]


def test_diagonal_fisher_is_the_mean_squared_per_sequence_gradient():
    model = _Tiny()
    model.hidden.bias.requires_grad_(False)
    batches = _batches()
    fisher = M.diagonal_fisher(model, batches)
    assert set(fisher) == set(model.state_dict())  # the tied head under both names
    assert fisher["head.weight"] is fisher["embed.weight"]
    assert model.hidden.bias.requires_grad is False and model.training  # flags and mode restored
    assert all(p.grad is None for p in model.parameters())
    ids, labels = batches[0]["input_ids"], batches[0]["labels"]
    expected = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    model.hidden.bias.requires_grad_(True)  # frozen or not, every parameter gets a Fisher
    for row in range(3):
        model.zero_grad()
        logp = torch.log_softmax(model(ids[row:row + 1]).logits[0, :-1], -1)
        target = labels[row, 1:]
        target = target.masked_fill(batches[0]["attention_mask"][row, 1:] == 0, -100)  # padding: no likelihood
        valid = target != -100
        logp[valid].gather(-1, target[valid][:, None]).sum().backward()
        for k, p in model.named_parameters():
            expected[k] += p.grad ** 2 if p.grad is not None else 0
    model.zero_grad(set_to_none=True)
    for k in expected:
        torch.testing.assert_close(fisher[k], expected[k] / 3)
    sampled = [M.diagonal_fisher(model, batches, targets="sampled", seed=s)["hidden.weight"] for s in (0, 0, 1)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])


def test_collect_grams_hooks_linear_inputs_and_skips_tied_and_padding():
    model = _Tiny()
    batches = _batches()
    grams = M.collect_grams(model, batches)
    assert set(grams) == {"hidden.weight"}  # the head is tied to the embedding: not a RegMean layer
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    x = model.embed(ids)[mask.bool()].detach()
    torch.testing.assert_close(grams["hidden.weight"], x.T @ x / x.shape[0])
    merged = M.regmean_merge([model.state_dict(), _Tiny(seed=1).state_dict()],
                             [grams, M.collect_grams(_Tiny(seed=1), batches)], alpha=0.9)
    assert set(merged) == set(model.state_dict())


def test_regmean_conv1d_layout_agrees_with_linear():
    from transformers.pytorch_utils import Conv1D

    gen = torch.Generator().manual_seed(0)
    ws = [torch.randn(3, 4, generator=gen) for _ in range(2)]  # Linear [out, in]
    xs = [torch.randn(20, 4, generator=gen) for _ in range(2)]
    lin = M.regmean_merge([{"w": w} for w in ws], [{"w": x.T @ x} for x in xs])["w"]
    conv = M.regmean_merge([{"w": w.T} for w in ws], [M.Grams({"w": x.T @ x}, in_first={"w"}) for x in xs])["w"]
    torch.testing.assert_close(conv, lin.T)
    layer = Conv1D(3, 4)
    grams = M.collect_grams(_Wrap(layer), [{"input_ids": xs[0][None]}])
    assert grams.in_first == {"layer.weight"}


class _Wrap(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, input_ids, attention_mask=None):
        return self.layer(input_ids)


def test_model_stock_ratio_by_hand():
    base = {"w": torch.zeros(2), "v": torch.ones(3)}
    ft = {"w": torch.tensor([1.0, 2.0]), "v": torch.ones(3)}
    merged, ratios = M.model_stock(base, [ft, ft], return_ratios=True)
    assert merged["w"].tolist() == [1.0, 2.0] and ratios["w"] == pytest.approx(1.0)  # cos = 1: the fine-tune
    assert merged["v"].tolist() == [1.0] * 3 and ratios["v"] == 0.0  # unchanged tensor: the base
    orthogonal = M.model_stock(base, [{"w": torch.tensor([1.0, 0.0]), "v": torch.ones(3)},
                                      {"w": torch.tensor([0.0, 1.0]), "v": torch.ones(3)}])
    assert orthogonal["w"].tolist() == [0.0, 0.0]  # cos = 0: back to the base
    # cos 60°: t = 2·0.5 / (1 + 0.5) = 2/3 of the way from the base to the average
    d1, d2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 3 ** 0.5 / 2])
    merged, ratios = M.model_stock(base, [{"w": d1, "v": torch.ones(3)}, {"w": d2, "v": torch.ones(3)}],
                                   return_ratios=True)
    assert ratios["w"] == pytest.approx(2 / 3)
    torch.testing.assert_close(merged["w"], (d1 + d2) / 2 * 2 / 3)
    # k = 3, all pairwise cos = 1/2: t = 3·0.5 / (1 + 2·0.5) = 3/4
    e = torch.eye(3) + 1.0
    k3 = [{"w3": (e[i] / e[i].norm())} for i in range(3)]
    cos = float(k3[0]["w3"] @ k3[1]["w3"])
    _, ratios = M.model_stock({"w3": torch.zeros(3)}, k3, return_ratios=True)
    assert ratios["w3"] == pytest.approx(3 * cos / (1 + 2 * cos))


@pytest.fixture(scope="module")
def tiny_llama():

    return modeling.from_config(modeling.tiny_config("llama", vocab_size=32, n_layer=1, d_model=16, max_len=16),
                              seed=0)


def test_lora_adapters_become_full_state_dicts(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model

    base_state = M.snapshot(tiny_llama)
    peft_model = get_peft_model(copy.deepcopy(tiny_llama),
                                LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_logits = peft_model(input_ids=ids).logits
    merged = M.lora_state_dict(peft_model)
    assert set(merged) == set(base_state)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    delta = layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[key], base_state[key] + delta)
    assert torch.equal(merged["model.layers.0.self_attn.k_proj.weight"],
                       base_state["model.layers.0.self_attn.k_proj.weight"])  # not adapted
    with torch.no_grad():
        torch.testing.assert_close(M.load(copy.deepcopy(tiny_llama), merged)(input_ids=ids).logits,
                                   expected_logits)
    _close(M.snapshot(tiny_llama), base_state, rtol=0, atol=0)  # the base was not touched
    peft_model.save_pretrained(tmp_path / "adapter")
    _close(M.lora_state_dict(tiny_llama, tmp_path / "adapter"), merged)
    # then any merge applies: the task vector of a LoRA fine-tune is nonzero only on the adapted weights
    tau = M.task_vector(merged, base_state)
    assert tau["model.layers.0.mlp.up_proj.weight"].abs().max() == 0 and tau[key].abs().max() > 0


def test_fisher_and_regmean_on_a_transformers_model(tiny_llama):
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    batches = [{"input_ids": ids, "attention_mask": mask}]
    state = M.snapshot(tiny_llama)
    fisher = M.diagonal_fisher(tiny_llama, batches, targets="sampled")
    assert set(fisher) == set(state) and all(f.abs().sum() > 0 for f in fisher.values())
    grams = M.collect_grams(tiny_llama, batches)
    layer = "model.layers.0"
    assert {f"{layer}.self_attn.q_proj.weight", f"{layer}.mlp.down_proj.weight"} <= set(grams)
    assert "lm_head.weight" not in grams  # tied to the embedding
    assert grams[f"{layer}.mlp.down_proj.weight"].shape == (64, 64)
    # merging a model with itself gives it back
    _close(M.regmean_merge([state, state], [grams, grams]), state, rtol=1e-4, atol=1e-5)
    _close(M.fisher_merge([state, state], [fisher, fisher]), state)
    _close(M.snapshot(tiny_llama), state, rtol=0, atol=0)  # statistics do not change the model


def test_named_task_vector_merges():
    base = _random_state(0)
    taus = [M.task_vector(_random_state(s), base) for s in (1, 2)]
    assert set(M.TASK_VECTOR_MERGES) == {"task_arithmetic", "ties", "dare", "dare_ties"}
    _close(M.TASK_VECTOR_MERGES["dare_ties"](base, taus, drop_rate=0.5, seed=3),
           M.dare(base, taus, drop_rate=0.5, seed=3, then="ties"))
    _close(M.TASK_VECTOR_MERGES["ties"](base, taus, density=1.0, scaling=0.0), base)
    _close((0.5 * taus[0]).materialize(), {k: v * 0.5 for k, v in taus[0].materialize().items()})


def test_snapshot_is_a_copy(tiny_llama):
    snap = M.snapshot(tiny_llama)
    live = tiny_llama.state_dict()
    assert all(snap[k].data_ptr() != live[k].data_ptr() for k in snap)
    assert snap["lm_head.weight"] is snap["model.embed_tokens.weight"]  # tied stays tied
    assert M.nbytes(snap) == sum(p.numel() * 4 for p in tiny_llama.parameters())


# --- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call,argument", [
    (lambda a, b: M.uniform_soup([]), "state_dicts"),
    (lambda a, b: M.uniform_soup(a), "state_dicts"),
    (lambda a, b: M.uniform_soup([a, {"w": a["w"]}]), "state_dicts[1]"),
    (lambda a, b: M.uniform_soup([a, {**a, "w": torch.zeros(3)}]), "state_dicts[1]['w']"),
    (lambda a, b: M.average([a, b], weights=[1]), "weights"),
    (lambda a, b: M.average([a, b], weights=[1, -1]), "weights[1]"),
    (lambda a, b: M.interpolate(a, b, 1.5), "alpha"),
    (lambda a, b: M.interpolate(a, {"w": a["w"]}, 0.5), "theta_1"),
    (lambda a, b: M.task_arithmetic(a, [M.task_vector(b, a)], scaling=-1), "scaling"),
    (lambda a, b: M.task_arithmetic(a, [M.task_vector(b, a)], scaling=float("nan")), "scaling"),
    (lambda a, b: M.task_arithmetic(a, []), "task_vectors"),
    (lambda a, b: M.task_vector({"w": a["w"]}, a), "finetuned"),
    (lambda a, b: M.ties_merging(a, [M.task_vector(b, a)], density=0), "density"),
    (lambda a, b: M.ties_merging(a, [M.task_vector(b, a)], sign_method="mean"), "sign_method"),
    (lambda a, b: M.dare(a, [M.task_vector(b, a)], drop_rate=1.0), "drop_rate"),
    (lambda a, b: M.dare(a, [M.task_vector(b, a)], seed=-1), "seed"),
    (lambda a, b: M.dare(a, [M.task_vector(b, a)], then="max"), "then"),
    (lambda a, b: M.fisher_merge([a, b], [a]), "fishers"),
    (lambda a, b: M.fisher_merge([a, b], [a, b], epsilon=0), "epsilon"),
    (lambda a, b: M.fisher_merge([a, b], [{"w": torch.ones(2)}, {"w": torch.ones(2)}]), "fishers[0]"),
    (lambda a, b: M.regmean_merge([a, b], [{"w": torch.eye(2)}, {}]), "grams[1]"),
    (lambda a, b: M.regmean_merge([a, b], [{"w": torch.eye(2)}] * 2, alpha=2), "alpha"),
    (lambda a, b: M.model_stock(a, [b]), "finetuned"),
    (lambda a, b: M.greedy_soup([a, b], score=3), "score"),
])
def test_bad_input_is_one_value_error_naming_the_argument(call, argument):
    a = {"w": torch.zeros(4, 3), "n": torch.tensor(0)}
    b = {"w": torch.ones(4, 3), "n": torch.tensor(0)}
    with pytest.raises(ValueError) as error:
        call(a, b)
    assert str(error.value).startswith(argument), str(error.value)


def test_a_greedy_soup_of_ingredients_that_do_not_average_keeps_one():
    """Chapter 4's "keeps at least two" can fail: when every average scores worse than the best ingredient alone
    (ingredients from different basins), the greedy soup is that ingredient and nothing else."""
    models = [{"x": torch.tensor([-1.0])}, {"x": torch.tensor([0.8])}, {"x": torch.tensor([1.2])}]

    def score(sd):  # two good basins, at -1 and +1; anything between them is bad
        return -float(min((sd["x"] - 1) ** 2, (sd["x"] + 1) ** 2)) - (0.5 if abs(float(sd["x"])) < 0.9 else 0.0)

    assert M.greedy_soup(models[:2], score).ingredients == [0]   # averaging -1 and +1 lands between the basins
    assert len(M.greedy_soup(models[1:], score).ingredients) == 2  # two fine-tunes of one basin average well


# --- state dicts on several devices ----------------------------------------------------------------------------
def test_state_dicts_on_different_devices_fail_with_one_clear_error():
    """Chapter 4 snapshotted θ₀ on the CPU while its fine-tunes lived on the GPU: torch.lerp failed deep inside
    WiSE-FT. Every merge now checks devices first and names the tensor and both devices."""
    here = {"w": torch.ones(3, 2), "b": torch.zeros(2)}
    there = {k: v.to("meta") for k, v in here.items()}
    for call in (lambda: M.interpolate(here, there, 0.5), lambda: M.average([here, there]),
                 lambda: M.task_vector(there, here), lambda: M.task_arithmetic(here, [M.task_vector(there, there)]),
                 lambda: M.ties_merging(here, [M.task_vector(there, there)])):
        with pytest.raises(ValueError, match=r"\['w'\] is on meta.*on cpu.*one device"):
            call()


def test_snapshot_copies_to_one_device_and_keeps_tied_weights_tied():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    state = M.snapshot(model, device="meta")
    assert {t.device.type for t in state.values()} == {"meta"}
    assert state["0.weight"] is state["1.weight"]
    same = M.snapshot(model)
    assert same["0.weight"].device.type == "cpu" and same["0.weight"] is not model[0].weight
