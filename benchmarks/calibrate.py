"""Calibrate the gpu profile: ftbook.train on randomly initialised models of the hub shapes, at the chapters' batches.

No download: each model is built from its config (Pythia-160m's GPT-NeoX, Qwen2.5-0.5B's Qwen2, RoBERTa-base's
encoder), so the measurement is the shape's cost, not its weights'. For every workload of the ``gpu`` profile it
measures tokens per second, model-FLOPs utilisation (``ftbook.train.model_flops_per_token`` against the GPU's dense
bf16 peak) and peak GPU memory — the out-of-memory question answered by measurement, including the T4 setting
(micro-batches of 4 with gradient checkpointing) for the chapters whose 32 x 512 batches do not fit 16 GB.

    python benchmarks/calibrate.py --out calibration.json          # on a GPU
    python benchmarks/calibrate.py --out calibration.json --cpu    # the same code path, shapes shrunk (dry run)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (shape, batch, seq_len, grad_accum, gradient checkpointing, which chapters train this way at gpu)
WORKLOADS = [
    # the scale profile's zoo ladder (Llama-style, vocab 4096) at its pre-training batch of 64 x 256
    ("zoo:scale-small", 64, 256, 1, False, "scale: pre-training zoo:scale-small (4 x 256)"),
    ("zoo:scale-base", 64, 256, 1, False, "scale: pre-training zoo:scale-base (8 x 512)"),
    ("zoo:scale-large", 64, 256, 1, False, "scale: pre-training zoo:scale-large (12 x 768), the largest rung"),
    ("roberta-base", 32, 128, 1, False, "ch 2: RoBERTa-base on SST-2/MRPC, full fine-tuning"),
    ("pythia-160m", 32, 256, 1, False, "ch 3: continual pre-training of Pythia-160m"),
    ("pythia-160m", 32, 48, 1, False, "ch 4, ch 8: fine-tuning Pythia-160m (checkpoints)"),
    ("qwen2.5-0.5b", 32, 512, 1, False, "ch 5, ch 6: full fine-tuning of Qwen2.5-0.5B at 32 x 512"),
    ("qwen2.5-0.5b", 32, 512, 8, True, "ch 5, ch 6 on a T4: 8 micro-batches of 4, gradient checkpointing"),
]


def hub_config(shape: str, *, shrink: bool = False):
    """The hub model's config, written out (no download); ``shrink``: 2 layers, 64 wide, 1000 tokens (CPU dry run)."""
    import transformers

    small = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 vocab_size=1000) if shrink else {}
    if shape.startswith("zoo:"):
        from ftbook import modeling, zoo

        recipe = zoo.recipe(shape[4:], "smoke" if shrink else None)
        return modeling.tiny_config(recipe.arch, vocab_size=recipe.vocab_size, n_layer=recipe.n_layer,
                                    d_model=recipe.d_model, n_head=recipe.n_head, max_len=max(256, recipe.seq_len))
    if shape == "pythia-160m":
        return transformers.GPTNeoXConfig(**{**dict(vocab_size=50304, hidden_size=768, num_hidden_layers=12,
                                                    num_attention_heads=12, intermediate_size=3072, rotary_pct=0.25,
                                                    max_position_embeddings=2048, use_parallel_residual=True,
                                                    tie_word_embeddings=False), **small})
    if shape == "qwen2.5-0.5b":
        return transformers.Qwen2Config(**{**dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                                                  num_attention_heads=14, num_key_value_heads=2,
                                                  intermediate_size=4864, max_position_embeddings=32768,
                                                  rope_theta=1_000_000.0, tie_word_embeddings=True),
                                               **small, **({"num_key_value_heads": 2} if shrink else {})})
    if shape == "roberta-base":
        return transformers.RobertaConfig(**{**dict(vocab_size=50265, hidden_size=768, num_hidden_layers=12,
                                                    num_attention_heads=12, intermediate_size=3072,
                                                    max_position_embeddings=514, type_vocab_size=1,
                                                    num_labels=2), **small})
    raise ValueError(f"unknown shape {shape!r}")


def build(shape: str, *, shrink: bool):
    import transformers

    config = hub_config(shape, shrink=shrink)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() and not shrink else "cpu"):  # initialised in place
        if shape == "roberta-base":
            return transformers.RobertaForSequenceClassification(config)
        return transformers.AutoModelForCausalLM.from_config(config)


def _classification_loss(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"][:, 0])


def measure(shape: str, batch: int, seq_len: int, grad_accum: int, checkpointing: bool, *, device: str,
            shrink: bool, warmup: int, steps: int) -> dict:
    """Train ``warmup + steps`` steps; tokens/s and MFU over the last ``steps``, peak memory over all."""
    from ftbook.train import TrainConfig, model_flops_per_token, peak_tflops, train

    model = build(shape, shrink=shrink)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    rows = {"input_ids": rng.integers(3, vocab, size=(batch * 4, seq_len))}
    loss_fn = None
    if shape == "roberta-base":
        rows["labels"] = rng.integers(0, 2, size=(batch * 4, 1))
        loss_fn = _classification_loss
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    config = TrainConfig(steps=warmup + steps, lr=1e-5, batch_size=batch, grad_accum=grad_accum, warmup_steps=0,
                         device=device, precision="auto", log_every=1, progress=False, seed=0)
    started = time.perf_counter()
    try:
        history = train(model, rows, config, loss_fn=loss_fn)
    except torch.OutOfMemoryError as exc:
        return {"shape": shape, "batch": batch, "seq_len": seq_len, "out_of_memory": str(exc)[:200]}
    wall = time.perf_counter() - started
    times = history.set_index("step")["seconds"]
    seconds = float(times.iloc[-1] - times.loc[warmup]) if warmup in times.index else float(times.iloc[-1])
    tokens = steps * batch * seq_len
    per_second = tokens / max(seconds, 1e-9)
    flops = model_flops_per_token(model, seq_len) * per_second
    name = torch.cuda.get_device_name(0) if device == "cuda" else None
    peak = peak_tflops(name)
    return {"shape": shape, "parameters": sum(p.numel() for p in model.parameters()), "batch": batch,
            "seq_len": seq_len, "grad_accum": grad_accum, "gradient_checkpointing": checkpointing,
            "precision": history.attrs.get("precision"), "seconds_per_step": round(seconds / steps, 4),
            "tokens_per_second": round(per_second, 1), "model_tflops_per_second": round(flops / 1e12, 2),
            "mfu": round(flops / (peak * 1e12), 4) if peak else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device == "cuda" else None,
            "wall_seconds": round(wall, 1), "device": name or device}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where the JSON goes")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU with shrunk shapes")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per workload (after 3 warm-up steps)")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: use --cpu for the dry run")
    if args.cpu:
        torch.set_num_threads(1)
    results = []
    for shape, batch, seq_len, accum, checkpointing, what in WORKLOADS:
        if args.cpu:
            batch, seq_len = min(batch, 8), min(seq_len, 32)
            accum = min(accum, 2)
        row = measure(shape, batch, seq_len, accum, checkpointing, device=device, shrink=args.cpu,
                      warmup=1 if args.cpu else 3, steps=2 if args.cpu else args.steps)
        row["workload"] = what
        results.append(row)
        print(json.dumps(row), flush=True)
    out = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "dry_run": args.cpu,
           "torch": torch.__version__, "workloads": results}
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
