"""A training run in its own process, for tests/test_train.py (resume after SIGKILL, data parallel).

    python tests/unit/_train_worker.py OUT.json [--steps N] [--checkpoint-dir D] [--checkpoint-every K]
                                  [--sleep S] [--grad-accum G]
    torchrun --standalone --nproc_per_node 2 tests/unit/_train_worker.py OUT.json ...

Trains a tiny Llama on random token data whose labels are partly masked (rows carry different numbers
of loss tokens, so a wrong loss average across processes or micro-batches shows), then writes the
history, the final loss and a checksum of the weights to OUT.json (main process only).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ftbook.modeling import from_config, tiny_config  # noqa: E402
from ftbook.train import TrainConfig, train  # noqa: E402


def make_data(n_rows: int = 64, seq_len: int = 32, vocab: int = 96, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n_rows, seq_len), generator=g)
    labels = ids.clone()
    prompt = torch.randint(1, seq_len - 4, (n_rows,), generator=g)  # mask a "prompt" of varying length
    labels[torch.arange(seq_len)[None, :] < prompt[:, None]] = -100
    return {"input_ids": ids.numpy(), "labels": labels.numpy()}


def make_model(vocab: int = 96, seed: int = 0):
    return from_config(tiny_config("llama", vocab_size=vocab, n_layer=1, d_model=32, n_head=2), seed=seed)


def checksum(model) -> float:
    return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def main() -> None:
    torch.set_num_threads(1)  # every run of a comparison computes with the same kernels
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--checkpoint-dir")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--sleep", type=float, default=0.0)
    p.add_argument("--grad-accum", type=int, default=1)
    args = p.parse_args()
    every = args.checkpoint_every
    cfg = TrainConfig(steps=args.steps, lr=3e-3, batch_size=8, grad_accum=args.grad_accum, warmup_steps=4,
                      eval_every=8, log_every=4, progress=False, checkpoint_dir=args.checkpoint_dir,
                      checkpoint_steps=tuple(range(every, args.steps + 1, every)) if every else ())
    model = make_model()
    on_step = (lambda step, m: time.sleep(args.sleep)) if args.sleep else None
    history = train(model, make_data(), cfg, eval_data={"val": make_data(24, seed=1)}, on_step=on_step)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps({
            "history": history.drop(columns="seconds").to_dict(orient="list"),
            "final_loss": float(history["train_loss"].iloc[-1]), "checksum": checksum(model),
            "processes": history.attrs["processes"], "resumed_from": history.attrs["resumed_from"]}))


if __name__ == "__main__":
    main()
