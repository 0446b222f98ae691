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
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

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
        # largest |attention logit| of the last forward pass (the instability probe); a tensor, read when asked
        # (GPT.max_attention_logit): a float() here would stop a GPU once per layer and forward pass
        self.max_logit = torch.zeros(())

    def forward(self, x):
        B, T, C = x.shape
        H, D = self.cfg.n_head, self.cfg.d_head
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        # Written out (not F.scaled_dot_product_attention): the logits are probed, and the Hessian-vector
        # products of ftbook.methods.curvature need double backward through every op.
        logits = (q @ k.transpose(-2, -1)) * self.cfg.attn_scale
        self.max_logit = logits.detach().abs().max()
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
        return float(torch.stack([b.attn.max_logit.to(self.wte.weight.device) for b in self.blocks]).max())

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
        handle = model.ln_f.register_forward_hook(lambda m, inp, o, seen=seen: seen.__setitem__("hidden", inp[0]))
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
