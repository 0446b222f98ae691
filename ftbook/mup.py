"""Maximal-update parametrisation (muP, Tensor Programs V) for a small, readable GPT.

Why here and not ``pip install mup``: the PyPI ``mup`` package requires ``torchvision``, which has no CPU
build on this stack — installing it swaps the CPU torch for a 3 GB CUDA build. muP is a handful of rules,
so the book writes them out (they are what the chapter teaches anyway).

The rules (Adam, Table 3 of Yang et al. 2022), for ``width_mult = width / base_width``:

==================  =========================  ===========================  ============================
parameter group     initialisation std         Adam learning rate           forward multiplier
==================  =========================  ===========================  ============================
embeddings, norms   constant                   ``lr``                       1
hidden matrices     ``1/sqrt(fan_in)``         ``lr / width_mult``          1
readout (unembed)   ``1/sqrt(fan_in)``         ``lr``                       ``1 / width_mult``
attention logits    —                          —                            ``1/d_head`` (not ``1/sqrt``)
==================  =========================  ===========================  ============================

Standard parametrisation (SP) is the same model with every multiplier and learning-rate scale at 1 and
the usual ``1/sqrt(d_head)`` attention. At ``width == base_width`` the two are *the same model*: muP only
changes how things scale away from the base, which is why a learning rate tuned at the base width
transfers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

PARAMETRIZATIONS = ("sp", "mup")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    width: int = 64
    n_layer: int = 2
    n_head: int = 4
    seq_len: int = 64
    parametrization: str = "mup"   # "sp" | "mup"
    base_width: int = 32           # muP == SP at this width
    qk_norm: bool = False          # LayerNorm on queries and keys (Wortsman et al. 2023)
    emb_std: float = 1.0           # embeddings: constant in width under both parametrisations

    def __post_init__(self):
        if self.parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"parametrization must be one of {PARAMETRIZATIONS}, got {self.parametrization!r}")
        for name in ("vocab_size", "width", "n_layer", "n_head", "seq_len", "base_width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.width % self.n_head or self.base_width % self.n_head:
            raise ValueError(f"width ({self.width}) and base_width ({self.base_width}) must be divisible by "
                             f"n_head ({self.n_head})")

    @property
    def width_mult(self) -> float:
        return self.width / self.base_width

    @property
    def d_head(self) -> int:
        return self.width // self.n_head

    @property
    def attn_scale(self) -> float:
        """SP: ``1/sqrt(d_head)``. muP: ``c/d_head`` with ``c`` chosen so both agree at the base width."""
        if self.parametrization == "sp":
            return 1.0 / math.sqrt(self.d_head)
        base_d = self.base_width // self.n_head
        return math.sqrt(base_d) / self.d_head

    @property
    def output_mult(self) -> float:
        return 1.0 / self.width_mult if self.parametrization == "mup" else 1.0

    @property
    def hidden_lr_scale(self) -> float:
        return 1.0 / self.width_mult if self.parametrization == "mup" else 1.0


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.proj = nn.Linear(cfg.width, cfg.width, bias=False)
        self.q_norm = nn.LayerNorm(cfg.d_head) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(cfg.d_head) if cfg.qk_norm else nn.Identity()
        self.register_buffer("causal", torch.ones(cfg.seq_len, cfg.seq_len, dtype=torch.bool).tril(),
                             persistent=False)
        self.max_logit = 0.0  # largest |attention logit| of the last forward pass (the instability probe)

    def forward(self, x):
        B, T, C = x.shape
        H, D = self.cfg.n_head, self.cfg.d_head
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        # Written out (not F.scaled_dot_product_attention): the logits are probed, and the Hessian-vector
        # products of ftbook.curvature need double backward through every op.
        logits = (q @ k.transpose(-2, -1)) * self.cfg.attn_scale
        self.max_logit = float(logits.detach().abs().max())
        logits = logits.masked_fill(~self.causal[:T, :T], float("-inf"))
        y = logits.softmax(-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.width), nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg)
        self.fc = nn.Linear(cfg.width, 4 * cfg.width, bias=False)
        self.fc_out = nn.Linear(4 * cfg.width, cfg.width, bias=False)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc_out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A nanoGPT-sized decoder (pre-LayerNorm, learned positions, untied readout) whose width is a knob.

    ``forward(input_ids=..., labels=None)`` returns an object with ``.logits`` and ``.loss`` (next-token
    cross-entropy when ``labels`` are given), so :func:`ftbook.train.train` can train it.
    """

    def __init__(self, cfg: GPTConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.width)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.width)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.width)
        self.readout = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        for name, p in self.named_parameters():
            group = parameter_group(name, p)
            if group == "embedding":
                nn.init.normal_(p, std=self.cfg.emb_std)
            elif group == "vector":
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            else:  # hidden and readout matrices: 1/sqrt(fan_in) in both parametrisations
                nn.init.normal_(p, std=p.shape[1] ** -0.5)

    def max_attention_logit(self) -> float:
        return max(b.attn.max_logit for b in self.blocks)

    def forward(self, input_ids, labels=None, attention_mask=None):
        T = input_ids.shape[1]
        x = self.wte(input_ids) + self.wpe(torch.arange(T, device=input_ids.device))
        for block in self.blocks:
            x = block(x)
        logits = self.readout(self.ln_f(x)) * self.cfg.output_mult
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return SimpleNamespace(logits=logits, loss=loss)


def parameter_group(name: str, p: torch.Tensor) -> str:
    """The muP class of a parameter: ``embedding``, ``vector`` (norms), ``hidden`` or ``readout``."""
    if name.startswith(("wte", "wpe")):
        return "embedding"
    if name.startswith("readout"):
        return "readout"
    return "hidden" if p.dim() >= 2 else "vector"


def lr_scales(model: GPT) -> dict[str, float]:
    """Adam learning-rate multiplier of every parameter group (muP: hidden matrices get 1/width_mult)."""
    return {"embedding": 1.0, "vector": 1.0, "hidden": model.cfg.hidden_lr_scale, "readout": 1.0}


def param_groups(model: GPT, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups for ``ftbook.train.train(..., param_groups=...)``: params, ``lr_scale``,
    ``weight_decay`` (decay on matrices only, as nanoGPT)."""
    scales = lr_scales(model)
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = parameter_group(name, p)
        groups.setdefault(g, {"params": [], "lr_scale": scales[g], "name": g,
                              "weight_decay": weight_decay if g in ("hidden", "readout") else 0.0})
        groups[g]["params"].append(p)
    return list(groups.values())


def make_model(vocab_size: int, width: int, parametrization: str, *, seed: int = 0, **kw) -> GPT:
    return GPT(GPTConfig(vocab_size=vocab_size, width=width, parametrization=parametrization, **kw), seed=seed)


# --- coordinate check (Yang et al. 2022, Fig. 5) -------------------------------------------------------
def coord_check(data, *, widths: Sequence[int], parametrization: str, lr: float, steps: int = 3,
                batch_size: int = 16, seed: int = 0, **model_kw) -> dict[int, dict[str, float]]:
    """Train each width a few Adam steps; return the mean |coordinate| of the residual stream after the
    last block (``hidden``), of the logits (``logits``) and of the logits' change since initialisation
    (``logits_change``) on a fixed batch, per width.

    Under muP these stay roughly constant as width grows; under SP the logits (and with them the
    updates) blow up ~linearly in width — the symptom that forces SP's learning rate down.
    """
    ids = torch.as_tensor(np.asarray(data["input_ids"][:batch_size]))
    model_kw = dict(model_kw)
    vocab_size = model_kw.pop("vocab_size", None) or int(ids.max()) + 1
    out = {}
    for width in widths:
        model = make_model(vocab_size, width, parametrization, seed=seed, seq_len=ids.shape[1], **model_kw)
        with torch.no_grad():
            logits0 = model(input_ids=ids).logits
        opt = adam(model, lr)
        for _ in range(steps):
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
        seen = {}
        handle = model.ln_f.register_forward_hook(lambda m, inp, o: seen.__setitem__("hidden", inp[0]))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        handle.remove()
        out[width] = {"hidden": float(seen["hidden"].abs().mean()), "logits": float(logits.abs().mean()),
                      "logits_change": float((logits - logits0).abs().mean())}
    return out


def adam(model: GPT, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW with muP's per-group learning rates (a plain optimizer, for tests and small loops)."""
    groups = [{"params": g["params"], "lr": lr * g["lr_scale"], "weight_decay": g["weight_decay"]}
              for g in param_groups(model, weight_decay)]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


# --- sweeps: one training run per (parametrisation, width, learning rate) ---------------------------
@dataclass(frozen=True)
class RunSpec:
    """One point of a sweep. ``sharpness_steps``: steps at which to measure the top Hessian eigenvalue
    (0 = at initialisation); ``log_every``: steps between loss / attention-logit records."""
    parametrization: str
    width: int
    lr: float
    steps: int = 100
    batch_size: int = 16
    warmup_steps: int = 10
    seed: int = 0
    qk_norm: bool = False
    base_width: int = 32
    n_layer: int = 2
    n_head: int = 4
    sharpness_steps: tuple[int, ...] = ()
    sharpness_iters: int = 20
    log_every: int = 5
    device: str = "cpu"


def train_point(spec: RunSpec, train_ids: np.ndarray, val_ids: np.ndarray, *, progress: bool = False) -> dict:
    """Train one model of ``spec`` with :func:`ftbook.train.train` (muP learning rates through its
    ``param_groups`` hook; warmup then cosine, no weight decay) and measure it.

    Returns a JSON-ready dict: the spec, ``val_loss`` (``inf`` when training diverged to a non-finite
    loss), ``curve`` (rows of step, train loss, largest attention logit) and ``sharpness``
    (rows of step, top eigenvalue of the loss Hessian on a fixed validation batch of 8 sequences).
    """
    from dataclasses import asdict

    from . import curvature
    from .train import TrainConfig, train

    train_ids, val_ids = np.asarray(train_ids), np.asarray(val_ids)
    model = make_model(int(max(train_ids.max(), val_ids.max())) + 1, spec.width, spec.parametrization,
                       seed=spec.seed, seq_len=train_ids.shape[1], qk_norm=spec.qk_norm,
                       base_width=spec.base_width, n_layer=spec.n_layer, n_head=spec.n_head)
    hessian_batch = torch.as_tensor(val_ids[:8])
    logits, sharpness = {}, []

    def measure(step, m):
        logits[step] = m.max_attention_logit()
        if step in spec.sharpness_steps:
            value = curvature.model_sharpness(m, hessian_batch.to(next(m.parameters()).device),
                                              iters=spec.sharpness_iters, tol=1e-3, seed=spec.seed)
            sharpness.append({"step": step, "sharpness": value})

    if 0 in spec.sharpness_steps:
        measure(0, model)
    cfg = TrainConfig(steps=spec.steps, lr=spec.lr, batch_size=spec.batch_size, warmup_steps=spec.warmup_steps,
                      schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0, log_every=spec.log_every,
                      seed=spec.seed, device=spec.device, progress=progress,
                      desc=f"{spec.parametrization} w={spec.width} lr={spec.lr:.3g}")
    import datasets

    history = _train(train, model, datasets.Dataset.from_dict({"input_ids": train_ids}), cfg,
                     eval_data={"val": datasets.Dataset.from_dict({"input_ids": val_ids})},
                     on_step=measure, param_groups=param_groups)
    final = history.iloc[-1]
    val = final.get("eval/val")
    val_loss = float(val) if val is not None and np.isfinite(val) else math.inf
    curve = [{"step": int(r.step), "train_loss": float(r.train_loss), "max_logit": logits.get(int(r.step))}
             for r in history.itertuples() if r.step > 0 and r.train_loss == r.train_loss]
    return {**asdict(spec), "val_loss": val_loss, "diverged": not math.isfinite(val_loss),
            "curve": curve, "sharpness": sharpness}


def _train(train, *args, param_groups, **kw):  # TEMPORARY until ftbook.train.train has param_groups
    import inspect

    from . import train as T

    if "param_groups" in inspect.signature(train).parameters:
        return train(*args, param_groups=param_groups, **kw)

    class ScaledAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            saved = [g["lr"] for g in self.param_groups]
            for g in self.param_groups:
                g["lr"] = g["lr"] * g["lr_scale"]
            try:
                return super().step(closure)
            finally:
                for g, lr in zip(self.param_groups, saved):
                    g["lr"] = lr

    original = T._make_optimizer
    T._make_optimizer = lambda model, cfg: ScaledAdamW(param_groups(model), lr=cfg.lr, betas=cfg.betas)
    try:
        return train(*args, **kw)
    finally:
        T._make_optimizer = original


def _store_tokens(train_ids, val_ids) -> None:
    from .parallel import worker_state

    worker_state().update(train=train_ids, val=val_ids)


def _run_stored(spec: RunSpec) -> dict:
    from .parallel import worker_state

    return train_point(spec, worker_state()["train"], worker_state()["val"])


def run_sweep(specs: Sequence[RunSpec], train_ids, val_ids, *, workers: int = 1, progress: bool = True,
              desc: str = "sweep") -> list[dict]:
    """Run every spec; with ``workers > 1`` in that many single-thread processes (each run is small:
    two processes of one thread beat one process of two threads on a 2-core machine). Results come
    back in the order of ``specs``, identical whatever ``workers`` is (each run is seeded)."""
    from functools import partial

    from .parallel import run_jobs

    specs = list(specs)
    # the token arrays go to each worker once (initializer), not once per run
    return run_jobs([partial(_run_stored, spec) for spec in specs], workers=workers,
                    cost=[spec.width * spec.steps for spec in specs], initializer=_store_tokens,
                    initargs=(np.asarray(train_ids), np.asarray(val_ids)), progress=progress, desc=desc)


def best_lr(results: Sequence[dict], parametrization: str, width: int) -> float:
    """The grid learning rate with the lowest validation loss (diverged runs count as infinite)."""
    rows = [r for r in results if r["parametrization"] == parametrization and r["width"] == width
            and not r["qk_norm"]]
    return min(rows, key=lambda r: (r["val_loss"], r["lr"]))["lr"]


def optimum_shift(results: Sequence[dict], parametrization: str, widths: Sequence[int],
                  grid: Sequence[float]) -> int:
    """How many grid steps the loss-optimal learning rate spans across ``widths`` (max index − min)."""
    grid = sorted(grid)
    idx = [min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / best_lr(results, parametrization, w))))
           for w in widths]
    return max(idx) - min(idx)


def lr_grid(lr_min: float, points: int) -> list[float]:
    """``lr_min · 2^k`` for ``k = 0 … points−1`` (a factor-2 grid, as in Yang et al.'s sweeps)."""
    return [lr_min * 2 ** k for k in range(points)]


def nearest(grid: Sequence[float], value: float) -> float:
    """The grid point closest to ``value`` in log scale."""
    return min(grid, key=lambda g: abs(math.log(g / value)))


def corpus_blocks(corpus: str, seed: int, *, n_docs: int, vocab_size: int, seq_len: int,
                  val_blocks: int = 128):
    """Token blocks for the sweep: ``(train_ids, val_ids, tokenizer)`` as int64 arrays ``[n, seq_len]``.

    ``corpus``: ``"world"`` (the book's synthetic corpus of this seed), an :mod:`ftbook.corpora` name, or a
    hub dataset ``hf:org/name@config`` (``gpu`` profile). A BPE tokenizer of ``vocab_size`` is trained on the
    training documents (cached by their hash).
    """
    from . import data as D

    if corpus == "world":
        from . import zoo

        docs = zoo.corpus(zoo.recipe("base", n_docs=int(n_docs / 0.95) + 1), seed)
        train_texts, val_texts = docs["train"][:n_docs], docs["val/world"]
    elif corpus.startswith("hf:"):
        from .continual import hub_texts

        train_texts = hub_texts(corpus, "train", max_docs=n_docs)
        val_texts = hub_texts(corpus, "validation", max_docs=max(200, n_docs // 20))
    else:
        from . import corpora

        train_texts, val_texts = corpora.texts(corpus, "train")[:n_docs], corpora.texts(corpus, "validation")
    tokenizer = D.train_tokenizer(train_texts, vocab_size=vocab_size)
    train_ids = np.asarray(D.pack(train_texts, tokenizer, seq_len)["input_ids"])
    val_ids = np.asarray(D.pack(val_texts, tokenizer, seq_len)["input_ids"])[:val_blocks]
    return train_ids, val_ids, tokenizer


def frames(results: Sequence[dict]):
    """Three tables from sweep results: one row per run (``runs``), the training curves (``curves``:
    step, train_loss, max_logit) and the sharpness measurements (``sharpness``)."""
    import pandas as pd

    keys = ("parametrization", "width", "lr", "qk_norm", "seed")
    runs = pd.DataFrame([{k: r[k] for k in (*keys, "val_loss", "diverged")} for r in results])
    curves = pd.DataFrame([{**{k: r[k] for k in keys}, **row} for r in results for row in r["curve"]])
    sharp = pd.DataFrame([{**{k: r[k] for k in keys}, **row} for r in results for row in r["sharpness"]])
    return runs, curves, sharp


def width_spread(values: Sequence[float]) -> float:
    """Coefficient of variation (std / |mean|) of one quantity across widths: 0 = width-independent."""
    v = np.asarray(values, dtype=float)
    return float(v.std() / max(abs(v.mean()), 1e-12))


__all__ = ["lr_grid", "nearest", "corpus_blocks", "frames", "width_spread",
           "GPTConfig", "GPT", "PARAMETRIZATIONS", "parameter_group", "lr_scales", "param_groups",
           "make_model", "coord_check", "adam", "RunSpec", "train_point", "run_sweep", "best_lr", "optimum_shift"]
