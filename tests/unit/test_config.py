import pytest

from ftbook import specs
from ftbook.config import ConfigError
from ftbook.env import notebook_parameters


def test_profile_defaults_then_chapter_diff_then_overrides():
    smoke = specs.make("01_pretraining", profile="smoke")
    cpu = specs.make("01_pretraining", profile="cpu")
    assert smoke.size_ladder == ["tiny", "base"] and cpu.size_ladder == ["tiny", "small", "base"]
    assert smoke.probe_facts < cpu.probe_facts and cpu.strict is False  # readers' runs never fail on a claim
    custom = specs.make("01", profile="cpu", seed=2, n_layer=4, probe_facts=10)
    assert (custom.n_layer, custom.seed, custom.probe_facts, custom.chapter) == (4, 2, 10, "01_pretraining")


def test_none_means_the_profile_value():
    assert specs.make("01", profile="smoke", size_ladder=None).size_ladder == ["tiny", "base"]


@pytest.mark.parametrize("overrides, parameter, words", [
    (dict(profile="cpux"), "profile", "did you mean 'cpu'"),
    (dict(n_layr=4), "n_layr", "did you mean 'n_layer'"),
    (dict(lr=-1e-3), "lr", "positive"),
    (dict(lr=0.0), "lr", "positive"),
    (dict(n_layer=0), "n_layer", "at least 1"),
    (dict(n_layer=2.5), "n_layer", "integer"),
    (dict(seed=-1), "seed", "non-negative"),
    (dict(size_ladder="tiny,bse"), "size_ladder", "did you mean 'base'"),
    (dict(size_ladder="base"), "size_ladder", "at least 2"),
    (dict(strict="yes"), "strict", "True or False"),
])
def test_bad_parameters_fail_with_one_message_naming_the_parameter(overrides, parameter, words):
    profile = overrides.pop("profile", "cpu")
    with pytest.raises(ConfigError) as err:
        specs.make("01_pretraining", profile=profile, **overrides)
    assert err.value.parameter == parameter
    assert f"'{parameter}'" in str(err.value) and words in str(err.value)


def test_unknown_chapter_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean '01_pretraining'"):
        specs.resolve("01_pretrainig")
    assert specs.resolve("1").name == "01_pretraining"


def test_config_is_read_only_and_hashable_to_a_digest():
    cfg = specs.make("01", profile="smoke")
    with pytest.raises(AttributeError):
        cfg.lr = 1.0
    assert cfg.digest() == specs.make("01", profile="smoke").digest() != specs.make("01", profile="cpu").digest()
    with pytest.raises(AttributeError, match="did you mean 'n_layer'"):
        _ = cfg.n_layers


def test_notebook_parameters_take_plain_values_only():
    import math

    namespace = {"profile": "smoke", "seed": 1, "n_layer": None, "math": math, "In": [], "_": 3,
                 "get_ipython": print, "ratio": 0.5}
    assert notebook_parameters(namespace) == {"profile": "smoke", "seed": 1, "n_layer": None, "ratio": 0.5}


def test_setup_rejects_a_misspelt_papermill_parameter_before_any_work(tmp_home):
    import ftbook

    with pytest.raises(ConfigError, match="n_layr"):
        ftbook.setup("01_pretraining", {"profile": "smoke", "seed": 0, "n_layr": 4}, quiet=True)
    assert not tmp_home.exists()  # nothing cached, no record


@pytest.mark.parametrize("chapter", ["02_adapters", "04_merging", "05_instruction_tuning", "06_forgetting"])
def test_model_knob_takes_zoo_hub_or_folder_specs(chapter):
    for good in ("zoo:base", "hf:org/name", "path:/models/x"):
        # chapter 2's main task asks about the book's world: a hub or folder model takes a rule task instead
        task = {} if chapter != "02_adapters" or good.startswith("zoo:") else {"task": "max"}
        assert specs.make(chapter, profile="cpu", seed=0, model=good, **task).model == good
    with pytest.raises(ConfigError, match="'model'.*zoo:base"):
        specs.make(chapter, profile="cpu", seed=0, model="base")


def test_list_knobs_are_lists_from_yaml_or_from_the_command_line():
    """Papermill passes YAML lists (`-p alphas '[0, 0.5, 1]'`); `ftbook run -p alphas=0,0.5,1` passes text. Both
    give the same list, its items of the default's type."""
    from_yaml = specs.make("04", profile="smoke", alphas=[0, 0.5, 1], tasks=["facts", "max"])
    from_text = specs.make("04", profile="smoke", alphas="0,0.5,1", tasks="facts,max")
    assert from_yaml.alphas == from_text.alphas == [0.0, 0.5, 1.0] and from_yaml.tasks == ["facts", "max"]
    assert all(isinstance(a, float) for a in from_yaml.alphas)
    assert specs.make("07", widths=[32, 64.0], instability_width=64).widths == [32, 64]
    with pytest.raises(ConfigError, match="'widths'.*int"):
        specs.make("07", widths=[32, 64.5])
    with pytest.raises(ConfigError, match="'alphas'.*float"):
        specs.make("04", alphas=[0, "half", 1])
    with pytest.raises(ConfigError, match="'tasks'.*list"):
        specs.make("04", tasks=3)


def test_dict_knobs_take_a_mapping_or_name_value_text():
    lrs = dict(full=1e-3, head=1e-2, lora=1e-2, ia3=1e-2, prefix=1e-2, prompt=1e-2, ln=1e-2, bitfit=1e-2,
               bottleneck=1e-2)
    text = ",".join(f"{k}={v}" for k, v in lrs.items())
    assert specs.make("02", method_lrs=lrs).method_lrs == specs.make("02", method_lrs=text).method_lrs == lrs
    with pytest.raises(ConfigError, match="'method_lrs'.*did you mean 'full'"):
        specs.make("02", method_lrs={**lrs, "ful": 1e-3})
    with pytest.raises(ConfigError, match="'method_lrs'.*name=value"):
        specs.make("02", method_lrs="full:1e-3")


def test_rules_between_knobs_live_in_the_spec_and_name_the_knob_at_fault():
    with pytest.raises(ConfigError) as err:
        specs.make("03", rewarm_steps=50, cpt_steps=40)
    assert err.value.parameter == "rewarm_steps" and "cpt_steps=40" in str(err.value)
    with pytest.raises(ConfigError) as err:
        specs.make("07", instability_width=96)
    assert err.value.parameter == "instability_width"
    with pytest.raises(ConfigError, match="'task'.*zoo:"):
        specs.make("02", model="hf:FacebookAI/roberta-base")
    assert specs.make("03", rewarm_steps=40, cpt_steps=40).rewarm_steps == 40


def test_notebook_parameters_take_lists_and_dicts_from_papermill():
    namespace = {"profile": "smoke", "alphas": [0, 0.5, 1], "method_lrs": {"full": 1e-3}, "Out": {}}
    assert notebook_parameters(namespace) == {"profile": "smoke", "alphas": [0, 0.5, 1], "method_lrs": {"full": 1e-3}}


# --- the scale profile and the code-path switch -----------------------------------------------------------------
def test_every_chapter_has_a_scale_profile_on_the_books_own_models():
    from ftbook.config import PROFILES

    assert PROFILES == ("smoke", "cpu", "scale", "gpu")
    for name, spec in specs.CHAPTERS.items():
        cfg = specs.make(name, profile="scale")
        assert cfg.device == "auto" and cfg.precision == "auto"
        hub_ids = [k for k, v in cfg.items() if isinstance(v, str) and v.startswith("hf:")]
        assert not hub_ids, f"{name} at scale downloads {hub_ids}"
        if "model" in spec.defaults and str(spec.defaults["model"]).startswith("zoo:"):
            assert cfg.model == "zoo:scale-base", name   # chapters take the model knob, not the literal "base"


def test_a_code_path_takes_another_profiles_ids_at_this_profiles_sizes():
    cfg = specs.make("04", profile="smoke", code_path="gpu", stand_ins=True)
    gpu, smoke = specs.make("04", profile="gpu"), specs.make("04", profile="smoke")
    assert (cfg.model, cfg.other_init) == (gpu.model, gpu.other_init)          # the gpu profile's hub models
    assert (cfg.steps, cfg.train_examples) == (smoke.steps, smoke.train_examples)   # the smoke profile's sizes
    assert (cfg.device, cfg.precision, cfg.threads) == ("auto", "auto", 1)
    assert (cfg.profile, cfg.code_path, cfg.stand_ins) == ("smoke", "gpu", True)
    assert specs.make("04", profile="cpu").stand_ins is False and specs.make("04").code_path == ""
    with pytest.raises(ConfigError, match="did you mean 'gpu'"):
        specs.make("04", profile="smoke", code_path="gpux")
    with pytest.raises(ConfigError, match="'code_path'.*no code path"):
        specs.make("04", profile="cpu", code_path="smoke")


def test_claims_the_scale_profile_judges_are_gpu_claims_of_the_chapter():
    """Each id in a spec's judged_at_scale is a claim its notebook declares with scale="gpu"."""
    import json
    import re

    from ftbook import run

    moved = 0
    for name, spec in specs.CHAPTERS.items():
        source = "".join("".join(c["source"]) for c in json.loads(run.notebook_path(name).read_text())["cells"])
        gpu_claims = {m for m in re.findall(r'book\.check\("([^"]+)"(?:(?!book\.check).)*?scale="gpu"', source,
                                            re.S)}
        assert set(spec.judged_at_scale) <= gpu_claims, (name, set(spec.judged_at_scale) - gpu_claims)
        moved += len(spec.judged_at_scale)
    assert moved == 22


def test_new_knobs_keep_the_cpu_values_and_split_where_the_gpu_needs_it():
    """The knobs the gpu path needed equal, at cpu and smoke, the values the code used before (claims unchanged)."""
    for profile in ("cpu", "smoke"):
        ch6 = specs.make("06", profile=profile)
        assert (ch6.world_model, ch6.world_seq_len, ch6.world_batch_size, ch6.forget_steps) == \
            ("zoo:base", ch6.seq_len, ch6.batch_size, ch6.steps)
        ch3 = specs.make("03", profile=profile)
        assert (ch3.finetune_batch_size, ch3.qa_seq_len) == (16, 32)
        ch8 = specs.make("08", profile=profile)
        assert ch8.scaling_finetune_lr == ch8.finetune_lr
        assert specs.make("05", profile=profile).grad_accum == 1
    gpu6 = specs.make("06", profile="gpu")   # experiments 2-4 keep their own model and sizes (was: Qwen's 32 x 512)
    assert gpu6.world_model == "zoo:scale-base" and gpu6.world_seq_len < gpu6.seq_len and gpu6.forget_steps < gpu6.steps
    gpu8 = specs.make("08", profile="gpu")   # from-scratch scaling runs are not fine-tuned at Pythia's 2e-5
    assert gpu8.scaling_finetune_lr > 10 * gpu8.finetune_lr
    gpu5 = specs.make("05", profile="gpu")   # the hub set sized by chat_pairs, far below every arm's own pairs
    assert 0 < gpu5.chat_pairs < gpu5.lima_clean_pairs


def test_smoke_sizes_bound_every_code_path():
    """The smoke profile names every size the scale and gpu diffs change (at the cpu value where smoke used it), so
    their code paths at smoke sizes stay seconds: no batch, row length or model shape of the bigger profiles leaks."""
    sizes = ("batch_size", "seq_len", "n_layer", "d_model", "n_head", "finetune_batch", "finetune_batch_size",
             "review_seq_len", "world_batch_size", "steps", "train_examples")
    for name in specs.CHAPTERS:
        for path in ("scale", "gpu"):
            cfg = specs.make(name, profile="smoke", code_path=path)
            smoke = specs.make(name, profile="smoke")
            leaked = {k: cfg[k] for k in sizes if k in cfg and cfg[k] != smoke[k]}
            allowed = {"02_adapters": {"seq_len", "hard_seq_len"}, "05_instruction_tuning": {"seq_len"},
                       "08_pretraining_checkpoints": {"seq_len"}}   # hub tokenizers need longer rows
            assert set(leaked) <= allowed.get(name, set()), (name, path, leaked)


def test_a_claim_is_judged_at_its_scale_and_every_larger_one_but_never_at_smoke():
    from ftbook.config import judged_at_scale

    assert judged_at_scale("cpu", "cpu") and judged_at_scale("cpu", "gpu") and judged_at_scale("scale", "scale")
    assert not judged_at_scale("scale", "cpu") and not judged_at_scale("gpu", "scale")
    assert not judged_at_scale("cpu", "smoke")
