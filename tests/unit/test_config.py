import pytest

from ftbook import config as C
from ftbook.env import notebook_parameters


def test_profile_defaults_then_chapter_diff_then_overrides():
    smoke = C.make("01_pretraining", profile="smoke")
    cpu = C.make("01_pretraining", profile="cpu")
    assert smoke.size_ladder == "tiny,base" and cpu.size_ladder == "tiny,small,base"
    assert smoke.strict is False and cpu.strict is True
    custom = C.make("01", profile="cpu", seed=2, n_layer=4, probe_facts=10)
    assert (custom.n_layer, custom.seed, custom.probe_facts, custom.chapter) == (4, 2, 10, "01_pretraining")


def test_none_means_the_profile_value():
    assert C.make("01", profile="smoke", size_ladder=None).size_ladder == "tiny,base"


@pytest.mark.parametrize("overrides, parameter, words", [
    (dict(profile="cpux"), "profile", "did you mean 'cpu'"),
    (dict(n_layr=4), "n_layr", "did you mean 'n_layer'"),
    (dict(lr=-1e-3), "lr", "positive"),
    (dict(lr=0.0), "lr", "positive"),
    (dict(n_layer=0), "n_layer", "at least 1"),
    (dict(n_layer=2.5), "n_layer", "integer"),
    (dict(seed=-1), "seed", "non-negative"),
    (dict(size_ladder="tiny,bse"), "size_ladder", "did you mean 'base'"),
    (dict(size_ladder="base"), "size_ladder", "at least two"),
    (dict(strict="yes"), "strict", "True or False"),
])
def test_bad_parameters_fail_with_one_message_naming_the_parameter(overrides, parameter, words):
    profile = overrides.pop("profile", "cpu")
    with pytest.raises(C.ConfigError) as err:
        C.make("01_pretraining", profile=profile, **overrides)
    assert err.value.parameter == parameter
    assert f"'{parameter}'" in str(err.value) and words in str(err.value)


def test_unknown_chapter_suggests_the_closest():
    with pytest.raises(C.ConfigError, match="did you mean '01_pretraining'"):
        C.resolve_chapter("01_pretrainig")
    assert C.resolve_chapter("1").name == "01_pretraining"


def test_config_is_read_only_and_hashable_to_a_digest():
    cfg = C.make("01", profile="smoke")
    with pytest.raises(AttributeError):
        cfg.lr = 1.0
    assert cfg.digest() == C.make("01", profile="smoke").digest() != C.make("01", profile="cpu").digest()
    with pytest.raises(AttributeError, match="did you mean 'n_layer'"):
        cfg.n_layers


def test_notebook_parameters_take_plain_values_only():
    import math

    namespace = {"profile": "smoke", "seed": 1, "n_layer": None, "math": math, "In": [], "_": 3,
                 "get_ipython": print, "ratio": 0.5}
    assert notebook_parameters(namespace) == {"profile": "smoke", "seed": 1, "n_layer": None, "ratio": 0.5}


def test_setup_rejects_a_misspelt_papermill_parameter_before_any_work(tmp_home):
    import ftbook

    with pytest.raises(C.ConfigError, match="n_layr"):
        ftbook.setup("01_pretraining", {"profile": "smoke", "seed": 0, "n_layr": 4}, quiet=True)
    assert not tmp_home.exists()  # nothing cached, no record


@pytest.mark.parametrize("chapter", ["02_adapters", "04_merging", "05_instruction_tuning", "06_forgetting"])
def test_model_knob_takes_zoo_hub_or_folder_specs(chapter):
    for good in ("zoo:base", "hf:org/name", "path:/models/x"):
        assert C.make(chapter, profile="cpu", seed=0, model=good).model == good
    with pytest.raises(C.ConfigError, match="'model'.*zoo:base"):
        C.make(chapter, profile="cpu", seed=0, model="base")
