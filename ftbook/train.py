"""One training loop for the whole book, on ``accelerate``.

Full models and peft models alike; AdamW; warmup then cosine / linear / constant decay; gradient
accumulation; bf16 / fp16 autocast; evaluation every N steps; checkpoints (safetensors) at chosen steps;
resume; a tqdm progress bar. Returns the history as a ``pandas.DataFrame``.

Determinism. The batch of step ``t`` depends only on (seed, t) — a fresh permutation each epoch — and
the torch random state (dropout) is re-seeded from (seed, t) at every step, so the same seed gives the
same history, and a run resumed from a checkpoint sees exactly what the uninterrupted run would have.

Loss. The default loss is the mean over the *tokens* of the global batch (labels -100 excluded), not a
mean of per-micro-batch means: with masked labels (instruction tuning) the two differ, and only the
token mean makes 1 process, ``grad_accum`` micro-batches and N processes compute the same update.

Several processes (``accelerate launch`` / ``torchrun``, DDP, gloo on CPU) each take ``rows[rank::N]``
of every global batch; DDP averages the gradients, so the update equals the single-process one up to
float rounding (the sums are taken in a different order). Evaluation batches are shared out the same
way and their sums all-reduced; only the main process writes checkpoints.

Continual pre-training *re-warms*: a new :class:`TrainConfig` (new schedule, warmup from ~0 to ``lr``
again) on an already-trained model, in a new ``checkpoint_dir``. Resuming, in contrast, continues the
schedule of the run that wrote the checkpoint, and refuses a checkpoint written under another schedule.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

SCHEDULES = ("cosine", "linear", "constant")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")
DEVICES = ("cpu", "cuda", "mps", "auto")
# The fields that change what a run computes: a checkpoint written under others is not resumed.
RUN_FIELDS = ("steps", "lr", "batch_size", "grad_accum", "warmup_steps", "schedule", "min_lr_ratio",
              "weight_decay", "betas", "clip_norm", "precision", "seed")
_SEQUENCES = (list, tuple, set, frozenset, range)
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.safetensors", "trainer_state.json")


class TrainConfigError(ValueError):
    """A :class:`TrainConfig` field has an invalid value (raised when the config is made)."""


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-3
    batch_size: int = 16                 # sequences per optimizer step (across all processes)
    grad_accum: int = 1                  # micro-batches per step (each batch_size / grad_accum)
    warmup_steps: int = 0
    schedule: str = "cosine"             # cosine | linear | constant (after the warmup)
    min_lr_ratio: float = 0.1            # cosine / linear decay to lr * min_lr_ratio
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    clip_norm: float | None = 1.0
    eval_every: int = 0                  # 0: evaluate only at the end
    eval_batches: int | None = None      # None: all of each eval set
    log_every: int = 0                   # history rows with train_loss every N steps (0: at evaluations)
    checkpoint_steps: tuple[int, ...] = ()
    checkpoint_dir: str | None = None
    resume: bool = True                  # continue from the latest checkpoint in checkpoint_dir
    precision: str = "fp32"              # fp32 | bf16 | fp16 | auto
    device: str = "cpu"                  # cpu | cuda | mps | auto (cuda, else mps, else cpu)
    seed: int = 0
    progress: bool = True
    desc: str = "train"

    def __post_init__(self):
        if isinstance(self.checkpoint_steps, _SEQUENCES):
            self.checkpoint_steps = tuple(sorted(self.checkpoint_steps))
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        problems = []

        def bad(name, must, value):
            problems.append(f"{name} must be {must}, got {value!r}")

        if not _is_int(self.steps) or self.steps < 1:
            bad("steps", "a positive integer", self.steps)
        if not _is_number(self.lr) or self.lr <= 0:
            bad("lr", "a positive number", self.lr)
        if not _is_int(self.batch_size) or self.batch_size < 1:
            bad("batch_size", "a positive integer", self.batch_size)
        if not _is_int(self.grad_accum) or self.grad_accum < 1:
            bad("grad_accum", "a positive integer", self.grad_accum)
        elif _is_int(self.batch_size) and self.batch_size % self.grad_accum:
            bad("batch_size", f"a multiple of grad_accum ({self.grad_accum})", self.batch_size)
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0 or \
                (_is_int(self.steps) and self.warmup_steps > self.steps):
            bad("warmup_steps", f"an integer in [0, steps={self.steps}]", self.warmup_steps)
        if self.schedule not in SCHEDULES:
            bad("schedule", f"one of {', '.join(SCHEDULES)}", self.schedule)
        if not _is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "a number in [0, 1]", self.min_lr_ratio)
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", "a number >= 0", self.weight_decay)
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2 and
                all(_is_number(b) and 0 <= b < 1 for b in self.betas)):
            bad("betas", "two numbers in [0, 1)", self.betas)
        if self.clip_norm is not None and (not _is_number(self.clip_norm) or self.clip_norm <= 0):
            bad("clip_norm", "a positive number or None", self.clip_norm)
        for name in ("eval_every", "log_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "an integer >= 0", getattr(self, name))
        if self.eval_batches is not None and (not _is_int(self.eval_batches) or self.eval_batches < 1):
            bad("eval_batches", "a positive integer or None", self.eval_batches)
        if any(not _is_int(s) or not (_is_int(self.steps) and 1 <= s <= self.steps)
               for s in self.checkpoint_steps):
            bad("checkpoint_steps", f"integers in [1, steps={self.steps}]", self.checkpoint_steps)
        if self.checkpoint_steps and not self.checkpoint_dir:
            bad("checkpoint_dir", "set when checkpoint_steps is", self.checkpoint_dir)
        if self.precision not in PRECISIONS:
            bad("precision", f"one of {', '.join(PRECISIONS)}", self.precision)
        if self.device not in DEVICES:
            bad("device", f"one of {', '.join(DEVICES)}", self.device)
        if not _is_int(self.seed):
            bad("seed", "an integer", self.seed)
        if problems:
            raise TrainConfigError("invalid TrainConfig: " + "; ".join(problems))

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warmup, then decay.

        Warmup climbs ``lr/W, 2 lr/W, ..., lr`` over the first ``W = warmup_steps`` steps (never 0, so no
        step is wasted); cosine and linear then fall towards ``lr * min_lr_ratio`` at ``steps``.
        """
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        floor = self.lr * self.min_lr_ratio
        if self.schedule == "linear":
            return floor + (self.lr - floor) * (1 - progress)
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def run_fields(self) -> dict:
        """The fields a resumed run must share with the run that wrote its checkpoint (JSON-ready)."""
        return json.loads(json.dumps({k: getattr(self, k) for k in RUN_FIELDS}))



@functools.lru_cache(maxsize=4)
def _epoch_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    order = np.random.default_rng([seed, epoch]).permutation(n_rows)
    order.flags.writeable = False
    return order


def batch_indices(n_rows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Rows of the global batch at ``step``: walk through a fresh permutation each epoch."""
    if n_rows < batch_size:  # tiny datasets (smoke runs): sample with repetition
        return np.random.default_rng([seed, step]).integers(0, n_rows, size=batch_size)
    epoch, offset = divmod(step, n_rows // batch_size)
    return _epoch_order(n_rows, seed, epoch)[offset * batch_size:(offset + 1) * batch_size].copy()


def _column(dataset, name) -> torch.Tensor:
    try:
        array = np.asarray(dataset[name])
    except ValueError:  # ragged rows, as lists
        array = None
    if array is None or array.dtype == object or array.ndim != 2:
        raise ValueError(f"column {name!r} must hold rows of token ids of the same length (rows of "
                         f"different lengths: pack or pad them first)")
    return torch.as_tensor(array, dtype=torch.long)


class TensorData:
    """A dataset's columns as tensors (input_ids, optional labels / attention_mask): fast indexing.

    ``targets`` holds the labels shifted by one (what position ``i`` predicts), -100 at the end.
    """

    def __init__(self, dataset):
        if isinstance(dataset, TensorData):
            self.columns, self.targets = dataset.columns, dataset.targets
            return
        names = list(dataset.column_names) if hasattr(dataset, "column_names") else list(dataset)
        if "input_ids" not in names:
            raise ValueError(f"training data needs an 'input_ids' column, has {names}")
        if hasattr(dataset, "with_format"):  # a datasets.Dataset: all rows at once, as numpy
            dataset = dataset.with_format("numpy")[:]
        self.columns = {k: _column(dataset, k) for k in ("input_ids", "labels", "attention_mask") if k in names}
        labels = self.columns.get("labels", self.columns["input_ids"])
        self.targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)

    def __len__(self):
        return len(self.columns["input_ids"])

    @property
    def seq_len(self) -> int:
        return self.columns["input_ids"].shape[1]

    def batch(self, rows, device) -> dict[str, torch.Tensor]:
        """The rows as a model batch (``input_ids``, ``labels``, ``attention_mask`` if present)."""
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        out = {k: v[rows].to(device) for k, v in self.columns.items()}
        if "labels" not in out:
            out["labels"] = out["input_ids"]
        return out

    def target_count(self, rows) -> int:
        """How many tokens of these rows carry a loss."""
        if "labels" not in self.columns:
            return len(rows) * (self.seq_len - 1)
        return int((self.targets[torch.as_tensor(np.asarray(rows), dtype=torch.long)] != -100).sum())


def _auto_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        # A T4 "supports" bf16 by emulation (slow); only native bf16 counts, else fp16 with loss scaling.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "fp32"


# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity) of GPUs the book is run on: the denominator of the
# model-FLOPs utilisation (MFU) in run records. Matched against torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0, "V100": 125.0,
               "T4": 65.0}


def peak_tflops(device_name: str | None) -> float | None:
    """The dense half-precision peak of a GPU by its name (H100 PCIe: 756), or None when unknown (CPUs)."""
    if not device_name:
        return None
    if "H100" in device_name and "PCIe" in device_name:
        return 756.0
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in device_name), None)


def model_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6 x the weights of every matrix product (linear layers, the output layer included
    even when tied to the embeddings; embedding look-ups cost nothing) + 12 x layers x width x context for attention
    (PaLM's MFU accounting)."""
    from transformers.pytorch_utils import Conv1D

    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", 0) or 0
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0) or 0
    return 6.0 * matmul + 12.0 * layers * width * seq_len


def measured_throughput(model, *, tokens: int, seconds: float, seq_len: int, precision: str) -> dict:
    """Tokens per second of a training run and its model-FLOPs utilisation (MFU: achieved / the device's peak;
    None on a CPU or an unknown GPU, and for fp32 runs, whose tensor-core peak is another number)."""
    device = next(model.parameters()).device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    per_second = tokens / max(seconds, 1e-9)
    flops = model_flops_per_token(model, seq_len) * per_second
    peak = peak_tflops(name) if precision in ("bf16", "fp16") else None
    return {"tokens_per_second": round(per_second, 1), "model_tflops_per_second": round(flops / 1e12, 3),
            "mfu": round(flops / (peak * 1e12), 4) if peak else None, "train_device": name or device.type,
            "train_precision": precision}


def _autocast(device: torch.device, dtype, *, training: bool = False):
    """Autocast to ``dtype`` (None: none). On CPU, training in bf16/fp16 also picks the plain ("math")
    attention kernel: the fused CPU flash-attention backward is several times slower in bf16 than in
    fp32 and would eat the whole autocast gain (measured in ftbook.bench)."""
    if dtype is None:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device.type, dtype=dtype))
    if training and device.type == "cpu":
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # torch < 2.3
            pass
        else:
            stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


# Above this many logits (rows x vocabulary), the loss is taken in chunks of rows, each recomputed in the backward pass
# (checkpointed): a float32 copy of every logit at once — 10 GB for Qwen2.5's 151k-token vocabulary at 32 x 512 —
# becomes one chunk's. The book's CPU models stay far below it and take the one-piece path.
CHUNKED_LOSS_ABOVE = 2 ** 28
LOSS_CHUNK = 2 ** 26     # logits per chunk


def _token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")


def chunked_loss_sum(logits: torch.Tensor, targets: torch.Tensor, *, chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Summed cross-entropy of ``logits`` [rows, vocab] against ``targets`` [rows], ``chunk`` logits at a time: each
    chunk's float32 copy lives only while its own loss (and, in the backward pass, its own gradient) is computed."""
    from torch.utils.checkpoint import checkpoint

    rows = max(1, chunk // logits.shape[-1])
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], rows):
        piece, wanted = logits[start:start + rows], targets[start:start + rows]
        if torch.is_grad_enabled() and piece.requires_grad:
            total = total + checkpoint(_token_loss_sum, piece, wanted, use_reentrant=False)
        else:
            total = total + _token_loss_sum(piece, wanted)
    return total


def _loss_sum(model, batch: Mapping[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of a batch (positions whose target is -100 excluded)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    if logits.numel() > CHUNKED_LOSS_ABOVE:
        return chunked_loss_sum(logits.flatten(0, 1), targets.flatten())
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                             ignore_index=-100, reduction="sum")


@torch.no_grad()
def _eval_sums(model, data: TensorData, *, batch_size: int, max_batches: int | None, device,
               autocast_dtype=None, rank: int = 0, world: int = 1) -> tuple[float, int]:
    """(summed loss, token count) over this process's share (batches ``rank::world``) of ``data``."""
    starts = list(range(0, len(data), batch_size))[:max_batches]
    total, count = 0.0, 0
    for start in starts[rank::world]:
        rows = np.arange(start, min(len(data), start + batch_size))
        targets = data.targets[torch.as_tensor(rows)].to(device)
        with _autocast(device, autocast_dtype):
            total += _loss_sum(model, data.batch(rows, device), targets).item()
        count += int((targets != -100).sum())
    return total, count


def evaluate_loss(model, data, *, batch_size: int = 32, max_batches: int | None = None,
                  device=None, autocast_dtype=None) -> float:
    """Mean token loss of ``model`` over ``data`` (the tokens whose label is not -100)."""
    data = TensorData(data)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        total, count = _eval_sums(model, data, batch_size=batch_size, max_batches=max_batches, device=device,
                                  autocast_dtype=autocast_dtype)
    finally:
        model.train(was_training)
    return total / max(1, count)


# --- checkpoints (safetensors only) ------------------------------------------------------------------
def _optimizer_to_safetensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, meta = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for idx, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                meta["scalars"][f"{idx}.{name}"] = value
    return tensors, meta


def _optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable tensors (all of a full model; adapters only for a peft model)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model, optimizer, step: int, history: list[dict], **state) -> None:
    """Write a resumable checkpoint atomically: a hidden temp folder renamed into place when complete.

    ``state`` adds JSON-ready entries to ``trainer_state.json`` (the loop stores its run fields there).
    A crash leaves at worst a ``.step-N.tmp`` folder, which :func:`latest_checkpoint` never picks.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
    tensors, meta = _optimizer_to_safetensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "optimizer": meta, "history": history,
                                                        **state}))
    if path.exists():  # move the old one aside first: there is always one complete step-N or .tmp
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)


def latest_checkpoint(directory: Path) -> Path | None:
    """The complete ``step-N`` folder with the largest N (half-written folders are ignored)."""
    directory = Path(directory)
    found = []
    for p in directory.glob("step-*"):
        suffix = p.name[len("step-"):]
        if suffix.isdigit() and all((p / f).is_file() for f in CHECKPOINT_FILES):
            found.append((int(suffix), p))
    return max(found)[1] if found else None


def _read_state(path: Path) -> dict:
    return json.loads((Path(path) / "trainer_state.json").read_text())


def load_trainable(model, file: Path, *, what: str = "checkpoint") -> None:
    """Copy the tensors of a safetensors ``file`` into ``model``'s parameters of the same names, in place
    (a checkpoint's or an adapter's trainable weights); a tensor the model lacks is an error naming ``what``."""
    from safetensors.torch import load_file

    weights = load_file(str(file))
    params = dict(model.named_parameters())
    unknown = [n for n in weights if n not in params]
    if unknown:
        raise ValueError(f"{what} {Path(file).parent} does not match the model (unknown tensors: {unknown[:3]})")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def load_checkpoint(path: Path, model, optimizer) -> tuple[int, list[dict]]:
    """Load weights and optimizer state in place; returns (step, history)."""
    from safetensors.torch import load_file

    path = Path(path)
    state = _read_state(path)
    load_trainable(model, path / "trainable.safetensors")
    optimizer.load_state_dict(_optimizer_from_safetensors(load_file(str(path / "optimizer.safetensors")),
                                                          state["optimizer"]))
    return state["step"], state["history"]


# --- the loop ----------------------------------------------------------------------------------------
def _make_optimizer(model, cfg: TrainConfig, param_groups: Callable | None = None):
    """AdamW over the trainable parameters. ``param_groups(model)`` may return the groups instead:
    ``[{"params": [...], "lr_scale": 0.5, "weight_decay": 0.1}, ...]`` — each group's learning rate is the
    schedule's times its ``lr_scale`` (muP scales hidden matrices' Adam lr by 1/width this way)."""
    if param_groups is not None:
        groups = [dict(g) for g in param_groups(model)]
        for g in groups:
            g["params"] = [p for p in g["params"] if p.requires_grad]
            g.setdefault("weight_decay", cfg.weight_decay)
            g.setdefault("lr_scale", 1.0)
        covered = {id(p) for g in groups for p in g["params"]}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise ValueError(f"param_groups leaves trainable parameters out of the optimizer: {missing[:3]}")
    else:
        # No weight decay on biases and norm gains, as in GPT-2/nanoGPT.
        decay, no_decay = [], []
        for _, p in model.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
                  {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    try:  # one fused kernel for all tensors (CPU too since torch 2.4); the default loops over tensors
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def progress_enabled() -> bool:
    """Progress bars, unless FTBOOK_PROGRESS=0 (the runner sets it: in an executed notebook, bars would
    be hundreds of stream outputs in the rendered page)."""
    import os

    return os.environ.get("FTBOOK_PROGRESS", "1") != "0"


def _seed_step(seed: int, step: int, device: torch.device) -> None:
    """Seed the random state of ``step`` (dropout): CPU generator, plus the GPU's when training on one.
    (Cheaper than ``torch.manual_seed``, which queues a seed for every accelerator type each time.)"""
    value = (seed * 1_000_003 + step) % (2 ** 63)
    torch.random.default_generator.manual_seed(value)
    if device.type == "cuda":
        torch.cuda.manual_seed(value)


@dataclass
class _Run:
    """The state one call of :func:`train` carries from step to step."""

    cfg: TrainConfig
    data: TensorData
    eval_sets: dict
    core: torch.nn.Module                 # the model itself
    model: torch.nn.Module                # what the loop calls: ``core``, or its DDP wrapper under several processes
    optimizer: torch.optim.Optimizer
    device: torch.device
    autocast_dtype: torch.dtype | None
    scaler: object | None                 # a GradScaler when training in fp16
    world: int = 1                        # processes (accelerate / torchrun)
    rank: int = 0
    accelerator: object | None = None     # only under several processes
    start_step: int = 0                   # the step a resumed run continues from
    history: list = field(default_factory=list)
    pending: list = field(default_factory=lambda: [0.0, 0])  # summed step losses and steps since the last row
    elapsed: float = 0.0                  # seconds spent before a resume
    began: float = field(default_factory=time.perf_counter)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, *values: float) -> list[float]:
        """Sum numbers over the processes (no-op for one)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()


def _processes(device_type: str):
    """(device, world, rank, accelerator). One process uses a plain device: accelerate's state is a process-wide
    singleton fixed by its first use, so a notebook that trained on a GPU could not then train on the CPU (or the
    other way round, silently). Several processes (``accelerate launch`` / ``torchrun``) get an Accelerator."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=device_type == "cpu")
        return accelerator.device, accelerator.num_processes, accelerator.process_index, accelerator
    if device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device()), 1, 0, None
    return torch.device(device_type), 1, 0, None


def _start(model, data, cfg: TrainConfig, eval_data, param_groups) -> _Run:
    """Place the model, build the optimizer, resume from the latest checkpoint of ``cfg.checkpoint_dir``."""
    device_type = cfg.device if cfg.device != "auto" else _auto_device()
    device, world, rank, accelerator = _processes(device_type)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size {cfg.batch_size} must split evenly over {world} processes x "
                         f"{cfg.grad_accum} micro-batches")
    # Precision is set here, per call, not by accelerate (whose mixed precision is fixed for the process's life).
    precision = resolve_precision(cfg.precision, device)
    core = model.to(device)
    run = _Run(cfg=cfg, data=TensorData(data), eval_sets={k: TensorData(v) for k, v in (eval_data or {}).items()},
               core=core, model=core, optimizer=_make_optimizer(core, cfg, param_groups), device=device,
               autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision),
               scaler=torch.amp.GradScaler(device.type) if precision == "fp16" else None,
               world=world, rank=rank, accelerator=accelerator)
    if cfg.checkpoint_dir and cfg.resume and (found := latest_checkpoint(Path(cfg.checkpoint_dir))) is not None:
        state = _read_state(found)
        theirs, ours = state.get("run", {}), cfg.run_fields()
        differ = [f"{k}={theirs.get(k)!r} there, {ours[k]!r} here" for k in ours if theirs.get(k) != ours[k]]
        if differ:
            raise ValueError(f"checkpoint {found} was written by a different run ({'; '.join(differ)}); "
                             f"use another checkpoint_dir or resume=False")
        run.start_step, run.history = load_checkpoint(found, core, run.optimizer)
        run.pending, run.elapsed = state.get("pending", run.pending), state.get("seconds", 0.0)
    if accelerator is not None:
        run.model = accelerator.prepare(core)
    return run


def _optimizer_step(run: _Run, step: int, loss_fn: Callable | None) -> float:
    """One optimizer step on the global batch of ``step``; returns its mean loss (summed over processes)."""
    cfg, data = run.cfg, run.data
    lr = cfg.lr_at(step)
    for group in run.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    rows = batch_indices(len(data), cfg.batch_size, step, cfg.seed)
    n_targets = max(1, data.target_count(rows))
    mine = rows[run.rank::run.world]  # this process's share of the global batch
    micro = cfg.batch_size // (run.world * cfg.grad_accum)
    step_loss = torch.zeros((), device=run.device)
    for k in range(cfg.grad_accum):
        part = mine[k * micro:(k + 1) * micro]
        batch = data.batch(part, run.device)
        # Gradients are all-reduced once per step, after the last micro-batch.
        sync = run.world == 1 or k == cfg.grad_accum - 1
        with contextlib.nullcontext() if sync else run.model.no_sync():
            with _autocast(run.device, run.autocast_dtype, training=True):
                if loss_fn is None:  # this share of the global batch's token mean
                    targets = data.targets[torch.as_tensor(part)].to(run.device)
                    loss = _loss_sum(run.model, batch, targets) / n_targets
                else:
                    loss = loss_fn(run.model, batch) / (cfg.grad_accum * run.world)
            scaled = loss * run.world  # DDP averages gradients over processes: undo it
            (scaled if run.scaler is None else run.scaler.scale(scaled)).backward()
        step_loss += loss.detach()
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    if cfg.clip_norm:
        torch.nn.utils.clip_grad_norm_([p for p in run.core.parameters() if p.requires_grad], cfg.clip_norm)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    (total,) = run.all_sum(step_loss.item())
    return total


def _log(run: _Run, step: int, evaluate: bool) -> None:
    """Append a history row: the mean train loss since the last row, and the eval losses if ``evaluate``."""
    mean = run.pending[0] / run.pending[1] if run.pending[1] else None
    row = {"step": step, "tokens": step * run.cfg.batch_size * run.data.seq_len, "lr": run.cfg.lr_at(max(0, step - 1)),
           "train_loss": mean, "seconds": run.elapsed + time.perf_counter() - run.began}
    if evaluate and run.eval_sets:
        run.core.eval()
        for name, ds in run.eval_sets.items():
            total, count = run.all_sum(*_eval_sums(run.core, ds, batch_size=32, max_batches=run.cfg.eval_batches,
                                                   device=run.device, autocast_dtype=run.autocast_dtype,
                                                   rank=run.rank, world=run.world))
            row[f"eval/{name}"] = total / max(1, count)
        run.core.train()
    run.history.append(row)
    run.pending[:] = [0.0, 0]


def train(model, data, cfg: TrainConfig, *, eval_data: Mapping[str, object] | None = None,
          on_step: Callable[[int, object], None] | None = None,
          loss_fn: Callable | None = None, param_groups: Callable | None = None) -> pd.DataFrame:
    """Train ``model`` on ``data`` (a Dataset with ``input_ids`` and optional ``labels``) in place.

    ``eval_data`` maps names to datasets whose mean loss is logged every ``eval_every`` steps and at the
    end (columns ``eval/<name>``). ``on_step(step, model)`` runs after each step (e.g. to measure).
    ``loss_fn(model, batch) -> loss`` replaces the default causal-LM loss; it gets the model as the
    loop runs it (DDP-wrapped under several processes: call it, don't read its attributes) and should
    return the mean loss of its batch. ``param_groups(model)`` replaces the default optimizer groups
    (see ``_make_optimizer``: per-group ``lr_scale`` and ``weight_decay``). Returns the history: one row per
    log / eval step with ``step``, ``tokens``, ``lr``, ``train_loss`` (mean over the steps since the previous
    row), ``seconds`` and ``eval/<name>``.
    """
    from tqdm.auto import tqdm

    run = _start(model, data, cfg, eval_data, param_groups)
    start_step = run.start_step
    was_training = run.core.training
    run.model.train()
    if start_step == 0 and run.eval_sets and not run.history:
        _log(run, 0, evaluate=True)
    bar = tqdm(total=cfg.steps, initial=start_step, desc=cfg.desc, leave=False, mininterval=1.0,
               disable=not cfg.progress or not run.is_main or not progress_enabled())
    rng_devices = [torch.cuda.current_device()] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        for step in range(start_step, cfg.steps):
            _seed_step(cfg.seed, step, run.device)  # dropout masks depend on (seed, step) only
            step_loss = _optimizer_step(run, step, loss_fn)
            done = step + 1
            bar.update()
            run.pending[0] += step_loss
            run.pending[1] += 1
            if not math.isfinite(step_loss):
                _log(run, done, evaluate=False)
                break  # diverged: the history shows it; the caller decides what that means
            bar.set_postfix_str(f"loss={step_loss:.3f}", refresh=False)
            if on_step is not None:
                on_step(done, run.core)
            evaluate = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.steps
            if evaluate or (cfg.log_every and done % cfg.log_every == 0):
                _log(run, done, bool(evaluate))
            if done in cfg.checkpoint_steps and run.is_main:
                save_checkpoint(Path(cfg.checkpoint_dir) / f"step-{done}", run.core, run.optimizer, done, run.history,
                                run=cfg.run_fields(), pending=run.pending,
                                seconds=run.elapsed + time.perf_counter() - run.began)
    bar.close()
    if run.accelerator is not None:
        run.accelerator.wait_for_everyone()
    run.core.train(was_training)
    frame = pd.DataFrame(run.history)
    frame.attrs.update(tokens_per_step=cfg.batch_size * run.data.seq_len, config=asdict(cfg),
                       precision=resolve_precision(cfg.precision, run.device), processes=run.world,
                       resumed_from=start_step)
    return frame
