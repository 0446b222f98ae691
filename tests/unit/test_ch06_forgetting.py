import pytest

from ftbook import data as D
from ftbook import modeling, specs

# --- effective rank ------------------------------------------------------------------------------------
# --- intruder dimensions -------------------------------------------------------------------------------
# --- LoRA and the weights it touches ---------------------------------------------------------------------
from ftbook.config import ConfigError
from ftbook.labs import ch06_forgetting as F


class _Tok:
    """Just enough of a tokenizer for a tiny model's size."""

    def __len__(self):
        return 40










# --- encoding and tasks ----------------------------------------------------------------------------------


def test_prose_tasks_answer_and_conflict_and_translate():
    sort = F.PROSE_TASKS["sort"]
    prompts, answers, lists = sort.examples(20, seed=3)
    assert all(a == " ".join(map(str, sorted(xs))) for a, xs in zip(answers, lists))
    _, flipped, same_lists = sort.examples(20, seed=3, conflicting=True)
    assert same_lists == lists and all(f == " ".join(map(str, sorted(xs, reverse=True))) for f, xs in zip(flipped,
                                                                                                          lists))
    second, answers2, _ = sort.examples(20, seed=3, language=2)
    assert second == [D.to_second_language(p) for p in prompts] and answers2 == answers  # digits are kept
    assert second[0].startswith("fbegrq ,")
    assert all(3 <= len(xs) <= 5 for xs in lists)
    # the prompts are the pre-training narratives cut before the answer
    for name, task in F.PROSE_TASKS.items():
        assert any(n.startswith(task.prompt + " {answer}") for n in D.TASKS[name].narratives)


def test_steps_to_reach():
    assert F.steps_to_reach([0, 5, 10], [0.1, 0.5, 0.9], 0.5) == 5
    assert F.steps_to_reach([0, 5, 10], [0.1, 0.5, 0.9], 0.95) is None
    assert F.steps_to_reach([0, 5, 10], [3.0, 2.0, 1.0], 1.5, higher_is_better=False) == 10


# --- the probe ------------------------------------------------------------------------------------------




# --- facts ----------------------------------------------------------------------------------------------


def test_known_unknown_split_follows_the_world_and_mix_holds_the_share(tokenizer):
    model = modeling.from_config(modeling.tiny_config("llama", vocab_size=len(tokenizer), n_layer=1, d_model=32),
                                 seed=1)
    world = D.World(seed=0, n_entities=8)
    known, unknown = F.split_known_unknown(model, tokenizer, world)
    assert all(f.seen for f in known) and not any(f.seen for f in unknown)
    assert not set(known) & set(unknown)
    pool_known = [f for f in world.facts if f.seen][:10]
    pool_unknown = [f for f in world.facts if not f.seen][:6]
    mix = F.mix_facts(pool_known, pool_unknown, 8, 0.5, seed=0)
    assert len(mix) == 8 and sum(not f.seen for f in mix) == 4
    assert F.mix_facts(pool_known, pool_unknown, 8, 0.5, seed=0) == mix
    with pytest.raises(ValueError, match="unknown"):
        F.mix_facts(pool_known, pool_unknown, 8, 1.0, seed=0)


# --- the chapter's knobs ------------------------------------------------------------------------------
@pytest.mark.parametrize("knob, value", [("lora_ranks", "0,2"), ("lora_ranks", "2.5"), ("full_lrs", "-1e-3"),
                                         ("lora_lrs", ""), ("unknown_shares", "0.5,0.2"), ("unknown_shares", "0,2"),
                                         ("energy", 0.0), ("intruder_threshold", 1.5), ("model", "bert"),
                                         ("target", "gsm8k"), ("steps", 1), ("revival_level", 0.0)])
def test_bad_knobs_fail_with_one_config_error_naming_them(knob, value):
    with pytest.raises(ConfigError, match=knob):
        specs.make("06_forgetting", profile="smoke", **{knob: value})


def test_profiles_resolve():
    cpu = specs.make("06_forgetting", profile="cpu")
    assert cpu.lora_ranks == [2, 8] and cpu.model == "zoo:base"
    gpu = specs.make("06_forgetting", profile="gpu")
    assert gpu.model.startswith("hf:") and gpu.target.startswith("hf:")


def test_forgetting_at_matched_learning_interpolates_the_reference_curve():
    import pandas as pd

    runs = pd.DataFrame({"method": ["full"] * 3 + ["LoRA r=2"] * 3, "lr": [1e-4, 3e-4, 1e-3, 3e-4, 1e-3, 3e-3],
                         "target loss": [2.0, 1.0, 0.5, 3.0, 1.5, 0.75],
                         "forgetting": [0.1, 0.3, 0.6, 0.0, 0.1, 0.5]})
    out = F.forgetting_at_matched_learning(runs)
    # LoRA at 3.0 lies outside full's range (0.5-2.0): not compared; at 1.5 full forgets 0.2, at 0.75 it forgets 0.45
    assert list(out.lr) == [1e-3, 3e-3]
    assert out["full at the same target loss"].tolist() == pytest.approx([0.2, 0.45])
    assert out["forgets less by"].tolist() == pytest.approx([0.1, -0.05])


def test_hub_target_pairs_skip_rows_longer_than_a_row_and_hold_out_the_next(tmp_home, monkeypatch):
    """MetaMathQA has worked answers longer than 512 tokens; encoding them raised. The pairs that fit are taken in
    order, the held-out ones after the training ones."""
    from ftbook import finetune as FT
    from ftbook import hub, models, standins

    monkeypatch.setenv(standins.ENV, "1")
    _, tokenizer = models.load("hf:Qwen/Qwen2.5-0.5B")
    train_p, train_a, eval_p, eval_a = F.hub_target_pairs("hf:meta-math/MetaMathQA", 300, 40, tokenizer, 64)
    assert (len(train_p), len(train_a), len(eval_p), len(eval_a)) == (300, 300, 40, 40)
    rows = FT.fitting_pairs(*hub.query_response_pairs("hf:meta-math/MetaMathQA", 400), tokenizer, 64)
    assert (train_p + eval_p, train_a + eval_a) == (rows[0][:340], rows[1][:340])   # in order: held out after
    assert len(FT.encode_pairs(train_p, train_a, tokenizer, 64)) == 300   # nothing to cut
    with pytest.raises(ValueError, match="does not fit seq_len=64"):
        long = [i for i, a in enumerate(standins._metamath("train", 40)) if len(a["response"]) > 1500][0]
        row = standins._metamath("train", 40)[long]
        FT.encode_pairs([f"Question: {row['query']}\nAnswer:"], [row["response"]], tokenizer, 64)
    with pytest.raises(ValueError, match="only .* pairs that fit"):
        F.hub_target_pairs("hf:meta-math/MetaMathQA", 5000, 10, tokenizer, 64)
