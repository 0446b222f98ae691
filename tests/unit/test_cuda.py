"""The gpu path on a real GPU: what the CPU tests check with stand-ins (meta tensors, monkeypatched capabilities),
checked on CUDA. Skipped where no GPU is visible (CI); the device check runs them (benchmarks/device_check.sh)."""
import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/device_check.sh)")


def _tiny(vocab: int = 96, seed: int = 0):
    from ftbook import modeling

    return modeling.from_config(modeling.tiny_config("llama", vocab_size=vocab, n_layer=1, d_model=32, n_head=2),
                                seed=seed)


def _rows(n: int = 64, seq_len: int = 16, vocab: int = 96):
    ids = np.random.default_rng(0).integers(0, vocab, size=(n, seq_len))
    return {"input_ids": ids}


def _config(**kw):
    from ftbook.train import TrainConfig

    return TrainConfig(**{"steps": 3, "batch_size": 8, "lr": 3e-3, "progress": False, **kw})


def test_cuda_then_cpu_then_cuda_in_one_process():
    from ftbook.train import train

    for device, precision in (("cuda", "auto"), ("cpu", "fp32"), ("cuda", "bf16"), ("auto", "auto")):
        model = _tiny()
        history = train(model, _rows(), _config(device=device, precision=precision))
        expected = "cpu" if device == "cpu" else "cuda"
        assert next(model.parameters()).device.type == expected, (device, precision)
        assert np.isfinite(history["train_loss"]).all()


def test_auto_precision_on_this_gpu_and_fp16_with_a_scaler():
    from ftbook import train as T

    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert T.resolve_precision("auto", torch.device("cuda")) == ("bf16" if native else "fp16")
    run = T._start(_tiny(), _rows(), _config(device="cuda", precision="fp16"), None, None)
    assert run.scaler is not None
    history = T.train(_tiny(), _rows(), _config(device="cuda", precision="fp16", steps=4))
    assert np.isfinite(history["train_loss"]).all()


def test_chunked_loss_on_the_gpu_is_the_full_loss():
    from ftbook.train import chunked_loss_sum

    torch.manual_seed(0)
    logits = torch.randn(300, 5000, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 5000, (300,), device="cuda")
    full = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
    (g_full,) = torch.autograd.grad(full, logits)
    torch.cuda.reset_peak_memory_stats()
    chunked = chunked_loss_sum(logits, targets, chunk=5000 * 16)
    (g_chunked,) = torch.autograd.grad(chunked, logits)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-5)
    assert torch.allclose(g_chunked.float(), g_full.float(), atol=1e-3)


def test_the_zoo_on_a_gpu_is_another_cache_entry_with_its_throughput(tmp_home):
    from ftbook import zoo

    gpu = zoo.pretrain("tiny", 7, profile="smoke", progress=False, device="cuda", precision="auto")
    cpu_key = zoo.recipe("tiny", "smoke").key()
    gpu_key = zoo.recipe("tiny", "smoke").key(zoo.precision_class("cuda", "auto"))
    assert gpu_key != cpu_key and gpu.name == f"tiny-s7-{gpu_key}"
    info = zoo.info("tiny", 7, "smoke", device="cuda", precision="auto")
    assert info["train_device"].startswith("NVIDIA") and info["tokens_per_second"] > 0 and info["mfu"] is not None


def test_merging_fine_tunes_trained_on_the_gpu(tmp_home):
    """Chapter 4's WiSE-FT died in torch.lerp(cpu, cuda): θ₀ and the fine-tunes now share the device."""
    from ftbook.labs import ch04_merging as L
    from ftbook.methods import merge as M

    base, tokenizer, world = L.load_base("zoo:base", 0, profile="smoke", device="cuda")
    theta_0 = M.snapshot(base)
    examples = L.task_examples("max", world, 32, split="train", seed=0)
    tuned = M.snapshot(L.finetune(base, tokenizer, examples, steps=2, lr=1e-3, seed=0, seq_len=40, device="cuda",
                                  precision="auto"))
    assert {t.device.type for t in list(theta_0.values()) + list(tuned.values())} == {"cuda"}
    halfway = M.interpolate(theta_0, tuned, 0.5)
    assert L.evaluate_state(base, halfway, tokenizer, {"max": examples})["max"] >= 0
    with pytest.raises(ValueError, match="one device"):
        M.interpolate(M.snapshot(base, device="cpu"), tuned, 0.5)


def test_prefix_tuning_of_an_encoder_on_the_gpu():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from ftbook.methods import peft as P

    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40, num_labels=2, pad_token_id=1)
    model = P.apply(RobertaForSequenceClassification(config), "prefix", virtual_tokens=3).to("cuda")
    ids = torch.randint(3, 100, (2, 7), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    out.logits.float().sum().backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "prompt_encoder" in n)


def test_weight_space_report_on_the_gpu_agrees_with_the_cpu():
    from ftbook.methods import weightspace as W

    g = torch.Generator().manual_seed(0)
    base = {f"m{i}": torch.randn(64, 48, generator=g) for i in range(2)}
    tuned = {k: v + 0.3 * torch.randn(64, 2, generator=g) @ torch.randn(2, 48, generator=g) for k, v in base.items()}
    cpu = W.update_report(base, tuned, top_k=4)
    gpu = W.update_report(base, tuned, top_k=4, base_svd=W.base_spectra(base, device="cuda"), device="cuda")
    assert list(cpu.effective_rank) == list(gpu.effective_rank) and list(cpu.intruders) == list(gpu.intruders)


def test_the_continual_pretraining_fine_tune_runs_on_the_gpu(tmp_home):
    from ftbook import data as D
    from ftbook import modeling
    from ftbook.labs import ch03_continual_pretraining as CP

    world = CP.specialist_world(0, 6)
    texts = CP.specialist_documents(world, 60, seed=0)
    tokenizer = D.train_tokenizer(texts, vocab_size=300)
    model = modeling.from_config(modeling.tiny_config(vocab_size=len(tokenizer), n_layer=1, d_model=32), seed=0)
    scores = CP.finetune_and_score(model.to("cuda"), tokenizer, CP.knowledge_task(world, 4, seed=0), steps=2,
                                   lr=1e-3, batch_size=8, seq_len=24, seed=0, device="cuda", precision="auto")
    assert 0 <= scores["test"] <= 1
