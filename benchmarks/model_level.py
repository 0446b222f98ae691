"""Can changing *how* the model computes make a CPU training step 1.5x faster? (foundation issue, 1.5x target)

`ftbook bench` shows that no training loop can be much faster than transformers.Trainer on the book's
bench model: even a bare loop (forward, backward, clip, AdamW, nothing else) is within a few per cent. What
is left is the work of the step itself. This script times that step, in one process and interleaved, with
every change that keeps the maths (same weights, same loss to float precision):

- ``hf``: the Hugging Face Llama as the book loads it (SDPA attention), eager AdamW;
- ``hf-eager-attention``: the same with the plain matmul-softmax attention;
- ``foreach-adamw`` / ``fused-adamw``: the optimizer's multi-tensor and fused kernels;
- ``compiled``: ``torch.compile(model)`` (inductor; the first 10 steps, which compile, are not timed);
- ``hand-fused``: the same Llama written by hand with fewer, larger kernels: q, k and v in one matmul,
  gate and up in one matmul, ``F.rms_norm``, rotary and SDPA;
- ``all-together``: the hand-fused model, compiled, with the fused AdamW.

Run: ``python benchmarks/model_level.py [--steps 40] [--rounds 2]``. Prints steady tokens per CPU-second
(1 thread) per arm and its ratio to ``hf``. Results are in benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from ftbook.bench import BenchSetup, bench_data, bench_model

WARMUP_STEPS = 10


class HandFusedLlama(torch.nn.Module):
    """The bench model's Llama (tied embeddings, RMSNorm, rotary, SwiGLU) with its weights copied into
    fused matrices: 4 matmuls per layer in place of 7."""

    def __init__(self, hf_model):
        super().__init__()
        cfg = hf_model.config
        self.d_model, self.n_head = cfg.hidden_size, cfg.num_attention_heads
        self.head_dim, self.eps = cfg.hidden_size // cfg.num_attention_heads, cfg.rms_norm_eps
        copy = lambda *tensors: torch.nn.Parameter(torch.cat([t.detach() for t in tensors]).clone())  # noqa: E731
        self.embed = copy(hf_model.model.embed_tokens.weight)
        self.final_norm = copy(hf_model.model.norm.weight)
        self.layers = torch.nn.ModuleList()
        for layer in hf_model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            block = torch.nn.Module()
            block.qkv = copy(attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight)
            block.out = copy(attn.o_proj.weight)
            block.gate_up = copy(mlp.gate_proj.weight, mlp.up_proj.weight)
            block.down = copy(mlp.down_proj.weight)
            block.norm_attn = copy(layer.input_layernorm.weight)
            block.norm_mlp = copy(layer.post_attention_layernorm.weight)
            self.layers.append(block)
        theta = cfg.rope_parameters["rope_theta"] if getattr(cfg, "rope_parameters", None) else cfg.rope_theta
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim))
        angles = torch.outer(torch.arange(cfg.max_position_embeddings).float(), inv_freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def _rotate(self, x, length):
        half = self.head_dim // 2
        return x * self.cos[:length] + torch.cat([-x[..., half:], x[..., :half]], -1) * self.sin[:length]

    def forward(self, input_ids):
        batch, length = input_ids.shape
        x = F.embedding(input_ids, self.embed)
        for block in self.layers:
            h = F.rms_norm(x, (self.d_model,), block.norm_attn, self.eps)
            q, k, v = F.linear(h, block.qkv).view(batch, length, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
            y = F.scaled_dot_product_attention(self._rotate(q, length), self._rotate(k, length), v, is_causal=True)
            x = x + F.linear(y.transpose(1, 2).reshape(batch, length, self.d_model), block.out)
            gate, up = F.linear(F.rms_norm(x, (self.d_model,), block.norm_mlp, self.eps), block.gate_up).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, block.down)
        logits = F.linear(F.rms_norm(x, (self.d_model,), self.final_norm, self.eps)[:, :-1], self.embed)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))


def make_arm(name: str, setup: BenchSetup, vocab_size: int):
    """(loss function of a batch, parameters, optimizer) for one arm, from the same seeded weights."""
    model = bench_model(setup, vocab_size)
    if name == "hf-eager-attention":
        model.config._attn_implementation = "eager"
    hf_loss = lambda m: (lambda batch: m(input_ids=batch, labels=batch).loss)  # noqa: E731
    if name in ("hand-fused", "all-together"):
        model = HandFusedLlama(model)
        loss_of = torch.compile(model) if name == "all-together" else model
    elif name == "compiled":
        loss_of = hf_loss(torch.compile(model))
    else:
        loss_of = hf_loss(model)
    kernel = {"foreach-adamw": {"foreach": True}, "fused-adamw": {"fused": True},
              "all-together": {"fused": True}}.get(name, {})
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=setup.lr, betas=(0.9, 0.95), weight_decay=0.1, **kernel)
    return loss_of, params, optimizer


def time_arm(name: str, setup: BenchSetup, ids: torch.Tensor, vocab_size: int, steps: int) -> dict:
    loss_of, params, optimizer = make_arm(name, setup, vocab_size)
    first_loss, stamps = None, []
    for step in range(WARMUP_STEPS + steps):
        start = step * setup.batch_size % (len(ids) - setup.batch_size)
        loss = loss_of(ids[start:start + setup.batch_size])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first_loss = float(loss.detach()) if first_loss is None else first_loss
        if step >= WARMUP_STEPS - 1:
            stamps.append(time.process_time())
    tokens = steps * setup.batch_size * setup.seq_len
    return {"tokens_per_cpu_s": tokens / (stamps[-1] - stamps[0]), "first_loss": first_loss,
            "last_loss": float(loss.detach())}


ARMS = ("hf", "hf-eager-attention", "foreach-adamw", "fused-adamw", "compiled", "hand-fused", "all-together")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per arm (after 10 untimed)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (median reported)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    args = parser.parse_args(argv)
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
    torch.set_num_threads(1)
    setup = BenchSetup()
    train_ds, _, tokenizer = bench_data(setup)
    ids = torch.as_tensor(np.asarray(train_ds.with_format("numpy")[:]["input_ids"]))
    runs = {arm: [] for arm in arms}
    for round_ in range(args.rounds):
        for arm in arms:
            runs[arm].append(time_arm(arm, setup, ids, len(tokenizer), args.steps))
            print(f"  round {round_} {arm:<20} {runs[arm][-1]['tokens_per_cpu_s']:8.0f} tok/CPU-s", flush=True)
    base = statistics.median(r["tokens_per_cpu_s"] for r in runs[arms[0]])
    print(f"\nsteady tokens per CPU-second, 1 thread, median of {args.rounds} (ratio to {arms[0]}):")
    print(f"{'arm':<20} {'tok/CPU-s':>9} {'ratio':>6} {'first loss':>11} {'last loss':>10}")
    for arm in arms:
        speed = statistics.median(r["tokens_per_cpu_s"] for r in runs[arm])
        print(f"{arm:<20} {speed:9.0f} {speed / base:5.2f}x {runs[arm][0]['first_loss']:11.5f} "
              f"{runs[arm][0]['last_loss']:10.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
