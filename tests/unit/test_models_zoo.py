import json

import pytest
import torch

from ftbook import data as D
from ftbook import modeling, models, zoo
from ftbook.train import evaluate_loss


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = D.world_documents(D.World(seed=0, n_entities=8), 200, seed=0)
    return D.train_tokenizer(texts, vocab_size=300, cache_dir=tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("spec, words", [
    ("base", "must look like"),
    ("zo:base", "did you mean 'zoo:'"),
    ("zoo:bse", "did you mean 'zoo:base'"),
    ("hf:EleutherAI/pythia-160m", "offline"),
    ("path:/nonexistent/folder", "does not exist"),
])
def test_bad_model_specs_fail_with_a_clear_message(spec, words, tmp_home):
    with pytest.raises(modeling.ModelSpecError, match=words):
        models.load(spec)
    assert not (tmp_home / "zoo").exists()


def test_tiny_models_are_seeded(tokenizer):
    a, _ = models.load("tiny:llama?n_layer=1&d_model=32", tokenizer=tokenizer, seed=1)
    b, _ = models.load("tiny:llama?n_layer=1&d_model=32", tokenizer=tokenizer, seed=1)
    c, _ = models.load("tiny:gpt2?n_layer=1&d_model=32", tokenizer=tokenizer, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert a.config.model_type == "llama" and c.config.model_type == "gpt2"


def test_save_pretrained_folder_loads_like_a_hub_model(tmp_path, tokenizer):
    """The hub path (`hf:`) and `path:` share load_pretrained; test it on a local folder."""
    model, _ = models.load("tiny:llama?n_layer=1&d_model=32", tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded, tok = models.load(f"path:{tmp_path / 'm'}")
    ids = torch.tensor([tokenizer("kalo lives in paris .")["input_ids"]])
    assert torch.allclose(model(ids).logits, loaded(ids).logits)
    assert tok.pad_token is not None
    # the same loader, given a hub-style name, reads the local folder too
    direct, _ = modeling.load_pretrained(str(tmp_path / "m"))
    assert torch.allclose(model(ids).logits, direct(ids).logits)


def test_pickled_weights_are_refused(tmp_path, tokenizer):
    model, _ = models.load("tiny:llama?n_layer=1&d_model=32", tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "m", safe_serialization=False)
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(modeling.ModelSpecError, match="safetensors"):
        models.load(f"path:{tmp_path / 'm'}")


def test_remote_code_is_never_run(tmp_path, tokenizer):
    model, _ = models.load("tiny:llama?n_layer=1&d_model=32", tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    try:
        models.load(f"path:{tmp_path / 'm'}")
    except (ValueError, OSError):
        pass  # refusing is fine; running evil.py is not (SystemExit would escape)


def test_zoo_trains_once_deterministically_and_keeps_checkpoints(tmp_home):
    entry = zoo.pretrain("tiny", 0, profile="smoke", progress=False)
    assert zoo.checkpoints("tiny", 0, "smoke") == ["step-10", "step-20", "final"]
    first = (entry / "final" / "model.safetensors").read_bytes()
    mtime = (entry / "manifest.json").stat().st_mtime
    assert zoo.pretrain("tiny", 0, profile="smoke").stat().st_mtime and \
        (entry / "manifest.json").stat().st_mtime == mtime  # cached: not trained again
    other = tmp_home.parent / "other-home"
    import os

    os.environ["FTBOOK_HOME"] = str(other)
    again = zoo.pretrain("tiny", 0, profile="smoke", progress=False)
    assert (again / "final" / "model.safetensors").read_bytes() == first  # same seed, same weights
    model, tok = zoo.load("tiny", 0, step="step-10", profile="smoke")
    assert model.config.num_hidden_layers == 1
    # Every kept step is its own weights, and "final" is the end of training, not the last kept step.
    from safetensors.torch import load_file

    weights = {step: load_file(str(again / step / "model.safetensors")) for step in ("step-10", "step-20", "final")}
    for a, b in (("step-10", "step-20"), ("step-20", "final")):
        assert any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a]), f"{a} == {b}"
    final_loss = zoo.history("tiny", 0, "smoke")["eval/world"].iloc[-1]
    final_model, _ = zoo.load("tiny", 0, profile="smoke")
    blocks = D.pack(zoo.corpus(zoo.recipe("tiny", "smoke"), 0)["val/world"], tok, zoo.recipe("tiny", "smoke").seq_len,
                    max_blocks=64)
    assert abs(evaluate_loss(final_model, blocks) - final_loss) < 1e-4  # the saved final is the trained model
    with pytest.raises(modeling.ModelSpecError, match="no checkpoint 'step-7'"):
        zoo.load("tiny", 0, step="step-7", profile="smoke")


def test_models_pretrained_side_by_side_are_the_ones_trained_one_after_another(tmp_home, monkeypatch):
    # chapter 1 pre-trains its ladder in two worker processes: the cached weights must not depend on it
    ladder = {"tiny": {}, "small": {"steps": 12}}
    side_by_side = zoo.pretrain_many(ladder, 0, profile="smoke", workers=2)
    monkeypatch.setenv("FTBOOK_HOME", str(tmp_home.parent / "one-after-another"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker, and in a chapter's kernel
    try:
        in_order = zoo.pretrain_many(ladder, 0, profile="smoke", workers=1)
    finally:
        torch.set_num_threads(threads)
    for name in ladder:
        assert in_order[name] != side_by_side[name]          # two homes, two entries
        assert (in_order[name] / "final" / "model.safetensors").read_bytes() == \
            (side_by_side[name] / "final" / "model.safetensors").read_bytes(), name
    assert zoo.pretrain_many(ladder, 0, profile="smoke", workers=2) == in_order   # cached: nothing trains


def test_recipe_overrides_are_a_different_cache_entry():
    assert zoo.recipe("base").key() != zoo.recipe("base", n_layer=4).key()
    assert zoo.recipe("base").key() == zoo.recipe("base", n_layer=2).key()
    assert zoo.recipe("base", "smoke").steps < zoo.recipe("base").steps
    with pytest.raises(modeling.ModelSpecError, match="did you mean 'n_layer'"):
        zoo.recipe("base", n_layers=4)


def test_corrupted_cache_is_detected_removed_and_rebuilt(tmp_home):
    entry = zoo.pretrain("tiny", 1, profile="smoke", progress=False)
    weights = entry / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(zoo.CorruptCheckpointError, match="corrupted"):
        zoo.load("tiny", 1, profile="smoke")
    assert not entry.exists()  # no corrupt cache left behind
    model, _ = zoo.load("tiny", 1, profile="smoke", progress=False)  # the next call re-trains it
    assert (entry / "manifest.json").exists()


def test_an_interrupted_pretraining_leaves_no_cache_entry(tmp_home, monkeypatch):
    from ftbook import train as T

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train", crash)
    with pytest.raises(KeyboardInterrupt):
        zoo.pretrain("tiny", 2, profile="smoke", progress=False)
    assert not zoo.is_cached("tiny", 2, "smoke")


# --- the zoo on a GPU machine: device, precision, the scale recipes -------------------------------------------
def test_fp32_keys_are_the_old_ones_and_other_precisions_another_entry():
    """Existing caches stay valid (these keys are the ones zoo format 2 always gave), and a bf16 model trained on a
    GPU is another entry: it never replaces the bit-reproducible fp32 one."""
    keys = {(n, p): zoo.recipe(n, p).key() for n in ("tiny", "small", "base") for p in (None, "smoke")}
    assert keys == {("tiny", None): "35366c6e22c9", ("tiny", "smoke"): "0be4e67ca467",
                    ("small", None): "016e70bb0d21", ("small", "smoke"): "def2e3fc18ba",
                    ("base", None): "b420cedc5610", ("base", "smoke"): "7d243baefa37"}
    base = zoo.recipe("base")
    assert base.key("fp32") == base.key() != base.key("bf16") != base.key("fp16")


def test_the_zoo_trains_where_the_caller_trains(tmp_home, monkeypatch):
    """A cpu chapter on a machine with a GPU pre-trains on the CPU in fp32 (it used to take the GPU: device="auto");
    a scale or gpu chapter passes its device (ftbook.setup: zoo.use_device)."""
    from ftbook import train as T

    seen = []

    def record(model, data, cfg, **kwargs):
        seen.append((cfg.device, cfg.precision))
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train", record)
    monkeypatch.delenv(zoo.DEVICE_ENV, raising=False)
    monkeypatch.delenv(zoo.PRECISION_ENV, raising=False)
    for kwargs in ({}, {"precision": "bf16"}):
        with pytest.raises(KeyboardInterrupt):
            zoo.pretrain("tiny", 3, profile="smoke", progress=False, **kwargs)
    monkeypatch.setenv(zoo.DEVICE_ENV, "cpu")   # restored after the test
    monkeypatch.setenv(zoo.PRECISION_ENV, "fp32")
    zoo.use_device("cuda", "bf16")
    with pytest.raises(KeyboardInterrupt):
        zoo.pretrain("tiny", 3, profile="smoke", progress=False)
    assert seen == [("cpu", "fp32"), ("cpu", "bf16"), ("cuda", "bf16")]
    assert zoo.precision_class("cpu", "auto") == "fp32"
    partial = sorted(p.name for p in (tmp_home / "zoo").glob("tiny-s3-*.partial"))
    assert partial == sorted({f"tiny-s3-{zoo.recipe('tiny', 'smoke').key(p)}.partial" for p in ("fp32", "bf16")})


def test_scale_recipes_form_a_ladder_and_shrink_to_smoke_size():
    ladder = [zoo.recipe(n) for n in ("scale-small", "scale-base", "scale-large")]
    assert [(r.n_layer, r.d_model) for r in ladder] == [(4, 256), (8, 512), (12, 768)]
    assert {r.train_tokens for r in ladder} == {1500 * 64 * 256} and ladder[1].n_entities == 256
    smoke = zoo.recipe("scale-base", "smoke")
    assert (smoke.n_layer, smoke.d_model, smoke.n_entities, smoke.steps, smoke.seq_len) == (2, 128, 64, 30, 64)


def test_a_hub_revision_without_safetensors_is_refused_naming_it(monkeypatch):
    """Some Pythia step branches hold only pytorch_model.bin (EleutherAI/pythia#206): the error names the revision."""
    from transformers import AutoModelForCausalLM

    def no_safetensors(*args, **kwargs):
        raise OSError("EleutherAI/pythia-160m does not appear to have a file named model.safetensors")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_safetensors)
    with pytest.raises(modeling.ModelSpecError, match=r"hf:EleutherAI/pythia-160m@step3000 has no safetensors"):
        modeling.load_pretrained("EleutherAI/pythia-160m", revision="step3000")
