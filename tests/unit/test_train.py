"""The training loop: config validation, schedule, determinism, resume after a kill, data parallel."""
from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ftbook.train import (
    TensorData,
    TrainConfig,
    batch_indices,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    train,
)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _train_worker as W  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORKER = str(HERE / "_train_worker.py")


def quiet(**kw) -> TrainConfig:
    return TrainConfig(**{"lr": 3e-3, "batch_size": 8, "warmup_steps": 2, "progress": False, **kw})


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- 4. validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("field, kwargs", [
    ("steps", {"steps": 0}),
    ("steps", {"steps": 2.5}),
    ("steps", {"steps": True}),
    ("lr", {"lr": 0}),
    ("lr", {"lr": -1e-3}),
    ("lr", {"lr": float("nan")}),
    ("schedule", {"schedule": "cosin"}),
    ("warmup_steps", {"warmup_steps": 11}),
    ("warmup_steps", {"warmup_steps": -1}),
    ("batch_size", {"batch_size": 6, "grad_accum": 4}),
    ("min_lr_ratio", {"min_lr_ratio": 1.5}),
    ("betas", {"betas": (0.9, 1.0)}),
    ("clip_norm", {"clip_norm": 0}),
    ("precision", {"precision": "int8"}),
    ("device", {"device": "tpu"}),
    ("checkpoint_steps", {"checkpoint_steps": (5, 20), "checkpoint_dir": "x"}),
    ("checkpoint_dir", {"checkpoint_steps": (5,)}),
    ("eval_every", {"eval_every": -1}),
])
def test_bad_config_raises_one_clear_error_naming_the_field(field, kwargs):
    kwargs = {"steps": 10, **kwargs}
    with pytest.raises(ValueError, match=rf"\b{field} must be") as info:
        TrainConfig(**kwargs)
    assert str(info.value).count(" must be ") == 1, info.value
    assert f"got {kwargs.get(field)!r}" in str(info.value)


def test_validation_happens_before_any_work(monkeypatch):
    import accelerate

    monkeypatch.setattr(accelerate, "Accelerator", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ValueError, match="lr must be"):
        train(W.make_model(), W.make_data(), TrainConfig(steps=5, lr=0.0))


def test_good_config_is_normalised():
    cfg = TrainConfig(steps=10, checkpoint_steps=[10, 5], checkpoint_dir="x", betas=[0.9, 0.99])
    assert cfg.checkpoint_steps == (5, 10) and cfg.betas == (0.9, 0.99)


# --- 6. schedule -----------------------------------------------------------------------------------------
def test_lr_schedule_warmup_then_decay_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # warmup never starts at 0
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert cfg.lr_at(55) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way down the cosine
    assert cfg.lr_at(100) == pytest.approx(1e-4) and cfg.lr_at(500) == pytest.approx(1e-4)
    linear = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, schedule="linear", min_lr_ratio=0.0)
    assert linear.lr_at(55) == pytest.approx(0.5e-3) and linear.lr_at(100) == 0.0
    constant = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, schedule="constant")
    assert constant.lr_at(5) == pytest.approx(0.6e-3) and constant.lr_at(99) == 1e-3
    assert TrainConfig(steps=5, lr=2e-3).lr_at(0) == 2e-3  # no warmup


def test_continual_pretraining_rewarms_with_a_fresh_schedule():
    model, data = W.make_model(), W.make_data()
    first = train(model, data, quiet(steps=12, log_every=1, min_lr_ratio=0.05))
    assert first["lr"].iloc[-1] < 0.1 * 3e-3  # the first schedule has decayed
    again = quiet(steps=12, log_every=1, warmup_steps=4, lr=2e-3)
    second = train(model, data, again)
    assert list(second["lr"][:4]) == pytest.approx([0.5e-3, 1e-3, 1.5e-3, 2e-3])  # warm again from ~0
    assert list(second["lr"]) == pytest.approx([again.lr_at(s) for s in range(12)])
    # it continued from the trained weights, not from scratch
    assert second["train_loss"].iloc[0] < first["train_loss"].iloc[0] - 0.05


# --- 1, 5. determinism, history, progress bar -------------------------------------------------------------
def test_same_seed_same_history_and_weights():
    runs = []
    for seed in (0, 0, 1):
        model = W.make_model()
        history = train(model, W.make_data(), quiet(steps=10, log_every=2, eval_every=5, seed=seed),
                        eval_data={"val": W.make_data(16, seed=1)})
        runs.append((history.drop(columns="seconds"), weights(model)))
    pd.testing.assert_frame_equal(runs[0][0], runs[1][0], check_exact=True)
    assert same_weights(runs[0][1], runs[1][1])
    assert not runs[0][0]["train_loss"].equals(runs[2][0]["train_loss"])  # the seed orders the batches


def test_history_columns_and_rows():
    history = train(W.make_model(), W.make_data(), quiet(steps=6, eval_every=3, log_every=2),
                    eval_data={"val": W.make_data(16, seed=1), "other": W.make_data(8, seed=2)})
    assert list(history.columns) == ["step", "tokens", "lr", "train_loss", "seconds", "eval/val", "eval/other"]
    assert list(history["step"]) == [0, 2, 3, 4, 6]
    assert list(history["tokens"]) == [0, 2 * 8 * 32, 3 * 8 * 32, 4 * 8 * 32, 6 * 8 * 32]
    assert history["eval/val"].notna().tolist() == [True, False, True, False, True]
    assert math.isnan(history["train_loss"][0]) and history["train_loss"][1:].notna().all()
    assert history["seconds"].is_monotonic_increasing
    assert history.attrs["tokens_per_step"] == 8 * 32 and history.attrs["processes"] == 1


def test_progress_bar_shows_and_can_be_disabled(capfd, monkeypatch):
    # The runner switches bars off for executed notebooks (FTBOOK_PROGRESS=0); a user's session has them.
    monkeypatch.setenv("FTBOOK_PROGRESS", "1")
    train(W.make_model(), W.make_data(), quiet(steps=3, progress=True, desc="bar-test"))
    assert "bar-test" in capfd.readouterr().err
    train(W.make_model(), W.make_data(), quiet(steps=3, progress=False, desc="bar-test"))
    captured = capfd.readouterr()
    assert "bar-test" not in captured.err + captured.out


def test_loss_is_a_token_mean_so_micro_batches_do_not_change_the_update():
    # Rows carry different numbers of loss tokens: a mean of micro-batch means would differ.
    histories, models = [], []
    for accum in (1, 2, 4):
        model = W.make_model()
        histories.append(train(model, W.make_data(), quiet(steps=6, grad_accum=accum, log_every=1)))
        models.append(weights(model))
    for h, m in zip(histories[1:], models[1:]):
        np.testing.assert_allclose(h["train_loss"], histories[0]["train_loss"], rtol=1e-5)
        for k in m:
            torch.testing.assert_close(m[k], models[0][k], rtol=1e-4, atol=2e-5)


def test_default_loss_matches_the_model_loss_on_unmasked_data():
    from ftbook.train import evaluate_loss

    model, data = W.make_model(), W.make_data()
    ids = torch.as_tensor(data["input_ids"])
    with torch.no_grad():
        expected = model(input_ids=ids, labels=ids).loss.item()
    assert evaluate_loss(model, {"input_ids": data["input_ids"]}, batch_size=64) == pytest.approx(expected, rel=1e-6)


def test_fp32_then_bf16_in_one_process():
    # accelerate fixes mixed precision for the life of a process; the loop must not depend on it.
    for precision in ("fp32", "bf16", "fp32"):
        history = train(W.make_model(), W.make_data(), quiet(steps=2, precision=precision))
        assert history.attrs["precision"] == precision and np.isfinite(history["train_loss"]).all()


def test_bf16_is_deterministic_and_close_to_fp32():
    losses = [train(W.make_model(), W.make_data(), quiet(steps=6, precision=p))["train_loss"].iloc[-1]
              for p in ("bf16", "bf16", "fp32")]
    assert losses[0] == losses[1]
    assert losses[0] == pytest.approx(losses[2], rel=1e-2)


def test_batches_depend_on_seed_and_step_only():
    a = [batch_indices(50, 8, s, seed=3) for s in range(12)]
    b = [batch_indices(50, 8, s, seed=3) for s in reversed(range(12))][::-1]
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert sorted(np.concatenate(a[:6])) == sorted(set(np.concatenate(a[:6])))  # no repeat within an epoch
    assert len(batch_indices(3, 8, 0, seed=0)) == 8  # fewer rows than a batch: sampled with repetition


def test_tensor_data_reads_datasets_and_rejects_ragged_rows():
    import datasets

    ds = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 6]]})
    td = TensorData(ds)
    assert td.columns["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert td.targets.tolist() == [[2, 3, -100], [5, 6, -100]]
    with pytest.raises(ValueError, match="different lengths"):
        TensorData(datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5]]}))
    with pytest.raises(ValueError, match="input_ids"):
        TensorData({"text": ["a"]})


# --- 2. checkpoints and resume -------------------------------------------------------------------------
def run_worker(out: Path, *args: str, timeout: float = 60) -> dict:
    subprocess.run([sys.executable, WORKER, str(out), *args], check=True, timeout=timeout,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted single-process run of the worker."""
    return run_worker(tmp_path_factory.mktemp("reference") / "out.json")


def test_resume_after_sigkill_matches_the_uninterrupted_run(tmp_path, reference):
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.json"
    args = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "4"]
    proc = subprocess.Popen([sys.executable, WORKER, str(out), *args, "--sleep", "0.1"],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 60
        while (found := latest_checkpoint(ckpt)) is None or int(found.name.split("-")[1]) < 8:
            assert proc.poll() is None, "the worker ended before it could be killed"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        proc.kill()
    assert not out.exists()
    # a checkpoint caught half-written must not be picked
    (ckpt / ".step-20.tmp").mkdir(exist_ok=True)
    (ckpt / ".step-20.tmp" / "trainable.safetensors").write_bytes(b"half")
    killed_at = int(latest_checkpoint(ckpt).name.split("-")[1])

    resumed = run_worker(out, *args)
    assert 8 <= resumed["resumed_from"] == killed_at < 24
    assert resumed["final_loss"] == reference["final_loss"]
    assert resumed["checksum"] == reference["checksum"]
    assert resumed["history"] == reference["history"]  # rows before the kill come from the checkpoint
    assert not (ckpt / ".step-20.tmp").exists()  # replaced by the real one when step 20 was saved

    # nothing left to do: the saved history and the final weights come back
    again = run_worker(out, *args)
    assert again["resumed_from"] == 24
    assert again["checksum"] == reference["checksum"] and again["history"] == reference["history"]


def test_latest_checkpoint_ignores_incomplete_folders(tmp_path):
    model, data = W.make_model(), W.make_data()
    train(model, data, quiet(steps=4, checkpoint_steps=(4,), checkpoint_dir=str(tmp_path)))
    (tmp_path / ".step-8.tmp").mkdir()
    (tmp_path / "step-12").mkdir()  # no files
    (tmp_path / "step-16").mkdir()
    (tmp_path / "step-16" / "trainer_state.json").write_text("{}")  # no weights
    (tmp_path / "step-x").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step-4"
    assert latest_checkpoint(tmp_path / "missing") is None


def test_resume_when_all_steps_are_done_returns_the_saved_run(tmp_path):
    cfg = quiet(steps=6, log_every=2, checkpoint_steps=(3, 6), checkpoint_dir=str(tmp_path))
    model = W.make_model()
    first = train(model, W.make_data(), cfg)
    fresh = W.make_model(seed=5)
    second = train(fresh, W.make_data(), cfg)
    assert second.attrs["resumed_from"] == 6
    pd.testing.assert_frame_equal(first, second)
    assert same_weights(weights(model), weights(fresh))


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    train(W.make_model(), W.make_data(), quiet(steps=4, checkpoint_steps=(2,), checkpoint_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"different run \(lr=0.003 there, 0.001 here"):
        train(W.make_model(), W.make_data(),
              quiet(steps=4, lr=1e-3, checkpoint_steps=(2,), checkpoint_dir=str(tmp_path)))
    history = train(W.make_model(), W.make_data(),  # resume=False starts over
                    quiet(steps=4, lr=1e-3, checkpoint_steps=(2,), checkpoint_dir=str(tmp_path), resume=False))
    assert history.attrs["resumed_from"] == 0


def test_checkpoints_are_safetensors_and_json_only(tmp_path):
    model = W.make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits.sum().backward()
    optimizer.step()
    save_checkpoint(tmp_path / "step-1", model, optimizer, 1, [{"step": 1}])
    names = sorted(p.name for p in (tmp_path / "step-1").iterdir())
    assert names == ["optimizer.safetensors", "trainable.safetensors", "trainer_state.json"]
    other = W.make_model(seed=1)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    assert load_checkpoint(tmp_path / "step-1", other, other_opt) == (1, [{"step": 1}])
    assert same_weights(weights(model), weights(other))
    ours, theirs = optimizer.state_dict()["state"], other_opt.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[i][k], theirs[i][k]) for i in ours for k in ours[i])


# --- 3. data parallel ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("launcher, accum", [("torchrun", 1), ("accelerate", 2)])
def test_two_processes_match_one(tmp_path, reference, launcher, accum):
    """2 CPU processes (gloo) each take half of every global batch; the result equals 1 process.

    Tolerance: the same tokens and the same token-mean loss, so the update is mathematically identical;
    only float summation order differs (each process sums its half of the gradient, gloo adds the
    halves), ~1e-7 relative per step. Measured after 24 Adam steps: ~3e-8 relative on the loss, ~2e-11
    on the weight checksum; we allow 1e-5 and 1e-7. A wrong loss average (mean of per-process means
    over rows with different numbers of loss tokens) is off by ~1e-3 and fails.
    """
    out, ckpt = tmp_path / "out.json", tmp_path / "ckpt"
    worker = [WORKER, str(out), "--grad-accum", str(accum), "--checkpoint-dir", str(ckpt), "--checkpoint-every", "8"]
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker]
    else:  # note: `accelerate launch --cpu --num_processes 2` would start ONE process (it needs mpirun)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *worker]
    subprocess.run(cmd, check=True, timeout=60, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   capture_output=True)
    result = json.loads(out.read_text())
    assert result["processes"] == 2
    assert result["final_loss"] == pytest.approx(reference["final_loss"], rel=1e-5)
    assert result["checksum"] == pytest.approx(reference["checksum"], rel=1e-7)
    for key in ("train_loss", "eval/val"):
        np.testing.assert_allclose(np.array(result["history"][key], dtype=float),
                                   np.array(reference["history"][key], dtype=float), rtol=1e-5)
    assert result["history"]["lr"] == reference["history"]["lr"]
    # one process wrote the checkpoints, whole, with the final weights
    from safetensors.torch import load_file

    assert sorted(p.name for p in ckpt.iterdir()) == ["step-16", "step-24", "step-8"]
    saved = load_file(str(ckpt / "step-24" / "trainable.safetensors"))
    assert sum(float(t.double().abs().sum()) for t in saved.values()) == pytest.approx(result["checksum"], rel=1e-12)


# --- the benchmark runs ------------------------------------------------------------------------------------
def test_bench_smoke(tmp_home):
    from ftbook import bench

    result = bench.compare_with_trainer(steps=4, rounds=1, arms=("ftbook/fp32", "trainer/fp32", "bare/fp32"),
                                        setup=bench.BenchSetup(n_layer=1, d_model=32, vocab_size=300, n_docs=300,
                                                               warmup_steps=2))
    assert result["ratio"]["cpu_tokens_per_s"] > 0 and result["arms"]["ftbook/fp32"]["deterministic"]
    assert result["ceiling"]["cpu_tokens_per_s"] > 0 and result["arms"]["bare/fp32"]["deterministic"]
    # the bare loop trains the same model: its loss is a language model's, not garbage
    assert 0 < result["arms"]["bare/fp32"]["eval_loss"] < 10
    assert "ftbook/trainer" in bench.format_tables(result,
                                                   None) and "bare loop/trainer" in bench.format_tables(result, None)


def test_hand_fused_llama_of_the_model_level_benchmark_is_the_same_model():
    # benchmarks/model_level.py compares step speeds; the comparison is fair only if every arm computes the
    # same loss and gradients from the same weights
    import importlib.util
    from pathlib import Path

    from ftbook import bench

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "model_level.py"
    spec = importlib.util.spec_from_file_location("model_level", path)
    model_level = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_level)
    setup = bench.BenchSetup(n_layer=2, d_model=64, vocab_size=300)
    hf = bench.bench_model(setup, 300)
    fused = model_level.HandFusedLlama(hf)
    batch = torch.randint(0, 300, (3, 17), generator=torch.Generator().manual_seed(0))
    hf_loss, fused_loss = hf(input_ids=batch, labels=batch).loss, fused(batch)
    assert fused_loss.item() == pytest.approx(hf_loss.item(), abs=1e-5)
    hf_loss.backward()
    fused_loss.backward()
    hf_qkv = torch.cat([getattr(hf.model.layers[1].self_attn, f"{n}_proj").weight.grad for n in "qkv"])
    assert torch.allclose(fused.layers[1].qkv.grad, hf_qkv, atol=1e-6)
    assert torch.allclose(fused.embed.grad, hf.model.embed_tokens.weight.grad, atol=1e-6)


# --- the gpu path: devices and precisions, tested on the CPU with stand-ins ------------------------------------
def test_one_process_builds_no_accelerator(monkeypatch):
    """accelerate's state is a process singleton fixed by its first use (a CUDA run, then cpu=True: ValueError; a
    CPU run, then CUDA: silently the CPU). One process trains on a plain device per call, never an Accelerator."""
    import accelerate

    def refuse(*args, **kwargs):
        raise AssertionError("an Accelerator was built for one process")

    monkeypatch.setattr(accelerate, "Accelerator", refuse)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for device in ("cpu", "auto", "cpu"):
        history = train(W.make_model(), W.make_data(), quiet(steps=2, device=device))
        assert np.isfinite(history["train_loss"]).all()


def test_each_call_places_the_model_on_its_own_device(monkeypatch):
    from ftbook import train as T

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert T._processes("cuda") == (torch.device("cuda", 0), 1, 0, None)
    assert T._processes("cpu") == (torch.device("cpu"), 1, 0, None)   # after a CUDA call: the CPU, as asked
    assert T._processes("meta")[0].type == "meta"


@pytest.mark.parametrize("native_bf16, expected", [(False, "fp16"), (True, "bf16")])
def test_auto_precision_takes_native_bf16_only(monkeypatch, native_bf16, expected):
    """A T4 reports bf16 as supported by emulation (slow): auto must pick fp16 (with loss scaling) there."""
    from ftbook.train import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: including_emulation or native_bf16)
    assert resolve_precision("auto", torch.device("cuda")) == expected
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cuda")) == "bf16"


def test_fp16_trains_with_loss_scaling():
    from ftbook import train as T

    run = T._start(W.make_model(), W.make_data(), quiet(steps=2, precision="fp16"), None, None)
    assert run.scaler is not None and run.autocast_dtype == torch.float16
    history = train(W.make_model(), W.make_data(), quiet(steps=3, precision="fp16"))
    assert history.attrs["precision"] == "fp16" and np.isfinite(history["train_loss"]).all()


def test_chunked_loss_is_the_full_loss_with_its_gradient():
    """Above CHUNKED_LOSS_ABOVE logits the loss is taken in checkpointed chunks (no float32 copy of every logit):
    the same sum and the same gradient."""
    from ftbook.train import chunked_loss_sum

    torch.manual_seed(0)
    logits = torch.randn(37, 50, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 50, (37,))
    targets[::5] = -100
    full = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
    (full_grad,) = torch.autograd.grad(full, logits)
    chunked = chunked_loss_sum(logits, targets, chunk=200)     # 4 rows per chunk
    (chunked_grad,) = torch.autograd.grad(chunked, logits)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)
    assert torch.allclose(chunked_grad.float(), full_grad.float(), atol=1e-3)


def test_big_vocabularies_take_the_chunked_loss_and_train_the_same(monkeypatch):
    from ftbook import train as T

    reference = train(W.make_model(), W.make_data(), quiet(steps=3))["train_loss"]
    calls = []
    original = T.chunked_loss_sum
    monkeypatch.setattr(T, "CHUNKED_LOSS_ABOVE", 0)
    monkeypatch.setattr(T, "chunked_loss_sum", lambda *a, **k: calls.append(1) or original(*a, chunk=1000))
    chunked = train(W.make_model(), W.make_data(), quiet(steps=3))["train_loss"]
    assert calls and np.allclose(chunked, reference, rtol=1e-5)


def test_throughput_and_model_flops_utilisation():
    from ftbook.train import measured_throughput, model_flops_per_token, peak_tflops

    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("Tesla T4") == 65.0 and peak_tflops(None) is None and peak_tflops("Some GPU") is None
    model = W.make_model()
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert model_flops_per_token(model, 16) == 6 * linear + 12 * model.config.num_hidden_layers * \
        model.config.hidden_size * 16
    out = measured_throughput(model, tokens=1000, seconds=2.0, seq_len=16, precision="bf16")
    assert out["tokens_per_second"] == 500.0 and out["mfu"] is None and out["train_device"] == "cpu"
