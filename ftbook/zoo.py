"""The zoo: models the book pre-trains itself, cached so every chapter also runs standalone.

``load("base", seed=0)`` returns the cached checkpoint or pre-trains it deterministically and caches
it under ``$FTBOOK_HOME/zoo/<name>-s<seed>-<hash>/`` (the hash covers the recipe and the corpus
version, so a changed recipe never reuses a stale model). The intermediate checkpoints are kept:
``load("base", step="step-400")`` — later chapters fine-tune them.

A cache entry is complete only when its ``manifest.json`` (written last) lists the sha256 of every
weight file; a truncated or corrupted entry is detected on load, removed, and reported.

Device and precision. The zoo trains where the run that asks for a model trains: ``device``/``precision`` arguments,
or the defaults :func:`use_device` sets (``ftbook.setup`` calls it with the chapter's device: the CPU in fp32 at the
``smoke`` and ``cpu`` profiles, the GPU at ``scale`` and ``gpu``). The cache key holds the precision class a model
was trained in, so a bf16 model trained on a GPU never replaces the bit-reproducible fp32 one (the key of an fp32
entry is what it always was).

The ``scale-*`` recipes are the ``scale`` profile's models: the same world, bigger (256 people, a 4096-token
vocabulary, ~25 M training tokens) in a ladder from 4 x 256 to 12 x 768 — minutes on one GPU, hours on a CPU.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import data as D
from .records import atomic_write_text, file_lock, ftbook_home, sha256_file

# Bump when the corpus or training code changes what a recipe produces.
ZOO_FORMAT = 2  # 2: "final" really is the last step (1 saved the last kept step there)


class CorruptCheckpointError(RuntimeError):
    """A cached checkpoint failed its checksum; it has been removed so the next call rebuilds it."""


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a pre-trained model."""

    arch: str = "llama"
    n_layer: int = 2
    d_model: int = 128
    n_head: int | None = None
    vocab_size: int = 1024
    seq_len: int = 64
    batch_size: int = 16
    steps: int = 1200
    lr: float = 3e-3
    warmup_steps: int = 100
    schedule: str = "cosine"
    n_entities: int = 64
    n_docs: int = 24000            # documents generated from the world
    real_text: tuple[str, ...] = ()  # ftbook.corpora names mixed into the corpus
    keep_steps: tuple[int, ...] = (100, 200, 400, 800)  # intermediate checkpoints kept for later chapters
    eval_every: int = 100

    def key(self, precision: str = "fp32") -> str:
        """The recipe's hash, with the precision class it is trained in (fp32 adds nothing: existing caches stay)."""
        fields = {"format": ZOO_FORMAT, **asdict(self)}
        if precision != "fp32":
            fields["precision"] = precision
        blob = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def train_tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len


# The named entries. `base` is the model most chapters fine-tune; tiny/small/base form a size ladder
# trained on the same tokens (chapter 1 compares them).
# The scale profile's world and schedule: 256 people, a 4096-token vocabulary, 1500 steps of 64 x 256 tokens
# (24.6 M tokens, the 120 k documents seen ~5 times), checkpoints kept as the cpu recipe keeps them (in proportion).
_SCALE = dict(vocab_size=4096, seq_len=256, batch_size=64, steps=1500, lr=1e-3, warmup_steps=150, n_entities=256,
              n_docs=120_000, keep_steps=(125, 250, 500, 1000), eval_every=125)
RECIPES: dict[str, Recipe] = {
    "tiny": Recipe(n_layer=1, d_model=64),
    "small": Recipe(n_layer=2, d_model=96),
    "base": Recipe(n_layer=2, d_model=128),
    # the scale ladder (same tokens for every rung): 3.1 M, 25 M and 85 M non-embedding parameters
    "scale-small": Recipe(n_layer=4, d_model=256, **_SCALE),
    "scale-base": Recipe(n_layer=8, d_model=512, **_SCALE),
    "scale-large": Recipe(n_layer=12, d_model=768, **_SCALE),
}
# The smoke profile trains these instead: seconds, not minutes. A recipe larger than the cpu base is also cut to its
# shape and world (a smoke run checks the code path of the scale profile, not its size).
SMOKE = dict(steps=30, warmup_steps=5, n_docs=600, keep_steps=(10, 20), eval_every=10, vocab_size=384)
SMOKE_CAPS = dict(n_layer=2, d_model=128, n_entities=64, seq_len=64, batch_size=16)
# Where the zoo trains when the caller does not say: environment variables, so that worker processes inherit them
# (ftbook.setup sets them to the chapter's device; unset: the CPU in fp32).
DEVICE_ENV, PRECISION_ENV = "FTBOOK_ZOO_DEVICE", "FTBOOK_ZOO_PRECISION"


def use_device(device: str = "cpu", precision: str = "fp32") -> None:
    """Train the zoo's models on ``device`` in ``precision`` unless a call says otherwise (``ftbook.setup`` does
    this with the chapter's device: a cpu run pre-trains on the CPU in fp32 even where a GPU is visible)."""
    os.environ[DEVICE_ENV], os.environ[PRECISION_ENV] = device, precision


def _default_device() -> tuple[str, str]:
    return os.environ.get(DEVICE_ENV) or "cpu", os.environ.get(PRECISION_ENV) or "fp32"


def precision_class(device: str | None = None, precision: str | None = None) -> str:
    """The precision a model trains in on ``device`` (``auto``: bf16 or fp16 on a GPU, fp32 on a CPU)."""
    import torch

    from .train import _auto_device, resolve_precision

    device = device or _default_device()[0]
    precision = precision or _default_device()[1]
    device = _auto_device() if device == "auto" else device
    return resolve_precision(precision, torch.device(device))


def recipe(name: str, profile: str | None = None, **overrides) -> Recipe:
    """The recipe of ``zoo:name``: its defaults, the ``smoke`` profile's shortcuts, then ``overrides``."""
    from .modeling import ModelSpecError

    if name not in RECIPES:
        close = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f" — did you mean 'zoo:{close[0]}'?" if close else ""
        raise ModelSpecError(f"unknown zoo model 'zoo:{name}'{hint} (known: {', '.join(RECIPES)})")
    fields = set(Recipe.__dataclass_fields__)
    unknown = set(overrides) - fields
    if unknown:
        bad = sorted(unknown)[0]
        close = difflib.get_close_matches(bad, fields, n=1)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        raise ModelSpecError(f"unknown zoo recipe field '{bad}'{hint}")
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None}
    if profile == "smoke":
        caps = {k: min(getattr(RECIPES[name], k), cap) for k, cap in SMOKE_CAPS.items()}
        overrides = {**SMOKE, **caps, **overrides}
    return replace(RECIPES[name], **overrides)


# --- the corpus ------------------------------------------------------------------------------------
def world(recipe: Recipe, seed: int) -> D.World:
    return D.World(seed=seed, n_entities=recipe.n_entities)


def corpus(recipe: Recipe, seed: int) -> dict[str, list[str]]:
    """Training documents and validation sets of the pre-training mix.

    The validation sets are held-out documents of each source, plus a probe of held-out facts.
    """
    w = world(recipe, seed)
    docs = D.world_documents(w, recipe.n_docs, seed=seed)
    train, val = D.split_texts(docs, 0.05, seed)
    out = {"train": train, "val/world": val}
    if recipe.real_text:
        from . import corpora

        for name in recipe.real_text:
            out["train"] = out["train"] + corpora.texts(name, "train")
            out[f"val/{name}"] = corpora.texts(name, "validation")
        random.Random(f"mix-{seed}").shuffle(out["train"])
    return out


def tokenizer_for(recipe: Recipe, seed: int):
    """The tokenizer of a recipe: trained on the recipe's training documents (seed 0's corpus, so all
    seeds share one vocabulary and their models can be compared and merged token for token)."""
    texts = corpus(recipe, 0)["train"]
    return D.train_tokenizer(texts, vocab_size=recipe.vocab_size)


# --- the cache --------------------------------------------------------------------------------------
def entry_dir(name: str, recipe: Recipe, seed: int, precision: str = "fp32") -> Path:
    return ftbook_home() / "zoo" / f"{name}-s{seed}-{recipe.key(precision)}"


def verify(entry: Path) -> dict:
    """Check an entry against its manifest; remove it and raise if anything is off."""
    manifest_path = entry / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        bad = [rel for rel, digest in manifest["files"].items() if sha256_file(entry / rel) != digest]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        bad = [f"manifest.json ({exc.__class__.__name__})"]
    if bad:
        shutil.rmtree(entry, ignore_errors=True)
        raise CorruptCheckpointError(
            f"cached zoo checkpoint {entry} is corrupted ({', '.join(bad[:3])} failed its checksum); "
            f"it has been removed — run again to re-train it")
    return manifest


def is_cached(name: str, seed: int = 0, profile: str | None = None, *, device: str | None = None,
              precision: str | None = None, **overrides) -> bool:
    entry = entry_dir(name, recipe(name, profile, **overrides), seed, precision_class(device, precision))
    return (entry / "manifest.json").exists()


def pretrain(name: str, seed: int = 0, *, profile: str | None = None, progress: bool = True,
             device: str | None = None, precision: str | None = None, **overrides) -> Path:
    """Return the cache entry of ``zoo:name`` at ``seed``, pre-training it first if needed (on ``device`` in
    ``precision``; None: :func:`use_device`'s, the CPU in fp32 unless a chapter said otherwise)."""
    rec = recipe(name, profile, **overrides)
    device, precision = device or _default_device()[0], precision or _default_device()[1]
    entry = entry_dir(name, rec, seed, precision_class(device, precision))
    with file_lock(entry.with_name(entry.name + ".lock")):  # two processes asking for one model train it once
        if (entry / "manifest.json").exists():
            verify(entry)
            return entry
        _pretrain_into(entry, name, rec, seed, progress, device=device, precision=precision)
    return entry


def _named(label: str, overrides: dict) -> tuple[str, dict]:
    """A request's zoo name and recipe overrides: ``recipe`` names the zoo entry when the label is not one
    (``{"small at a constant lr": {"recipe": "small", "schedule": "constant"}}``)."""
    overrides = dict(overrides)
    return overrides.pop("recipe", label), overrides


def pretrain_many(requests: dict[str, dict], seed: int = 0, *, profile: str | None = None,
                  workers: int = 1, device: str | None = None, precision: str | None = None) -> dict[str, Path]:
    """:func:`pretrain` several zoo models (``{label: overrides}``; ``overrides["recipe"]`` names the zoo entry when
    the label is not one) and return ``{label: entry}``.

    With ``workers > 1`` the models not cached yet train side by side in single-thread worker processes
    (:class:`ftbook.parallel.Pool`), the biggest first; every run is seeded and single-threaded either way,
    so the cached models are the same bit for bit. Chapter 1's ladder (tiny, small, base: 42 + 86 + 130 s one
    after another) took 142 s in two workers on a 2-core machine (two runs slow each other: base took 159 s)."""
    from functools import partial

    from .parallel import Pool

    device, precision = device or _default_device()[0], precision or _default_device()[1]
    where = dict(device=device, precision=precision)
    named = {label: _named(label, overrides) for label, overrides in requests.items()}
    missing = {label: (name, overrides) for label, (name, overrides) in named.items()
               if not is_cached(name, seed, profile, **where, **overrides)}
    if missing:
        jobs = {label: partial(pretrain, name, seed, profile=profile, progress=workers == 1, **where, **overrides)
                for label, (name, overrides) in missing.items()}
        # cost ~ steps x weights per token: the biggest model starts first, the small ones fill the other worker
        cost = {label: (r := recipe(name, profile, **overrides)).steps * r.n_layer * r.d_model ** 2
                for label, (name, overrides) in missing.items()}
        with Pool(min(workers, len(jobs))) as pool:
            pool.map(jobs, cost=cost, desc="pre-train zoo models")
    return {label: pretrain(name, seed, profile=profile, **where, **overrides)
            for label, (name, overrides) in named.items()}


def _pretrain_into(entry: Path, name: str, rec: Recipe, seed: int, progress: bool, *, device: str = "cpu",
                   precision: str = "fp32") -> None:
    from . import modeling
    from .train import TrainConfig, measured_throughput, train

    work = entry.with_name(entry.name + ".partial")  # checkpoints here survive a crash: resume
    work.mkdir(parents=True, exist_ok=True)
    texts = corpus(rec, seed)
    tokenizer = tokenizer_for(rec, seed)
    train_blocks = D.pack(texts["train"], tokenizer, rec.seq_len)
    evals = {k.split("/", 1)[1]: D.pack(v, tokenizer, rec.seq_len, max_blocks=64)
             for k, v in texts.items() if k.startswith("val/")}
    config = modeling.tiny_config(rec.arch, vocab_size=len(tokenizer), n_layer=rec.n_layer,
                                d_model=rec.d_model, n_head=rec.n_head, max_len=max(256, rec.seq_len))
    model = modeling.from_config(config, seed=seed)
    keep = tuple(s for s in rec.keep_steps if s < rec.steps)
    cfg = TrainConfig(steps=rec.steps, lr=rec.lr, batch_size=rec.batch_size, warmup_steps=rec.warmup_steps,
                      schedule=rec.schedule, eval_every=rec.eval_every, seed=seed,
                      checkpoint_steps=keep + (rec.steps,), checkpoint_dir=str(work / "train"),
                      progress=progress, desc=f"pre-train zoo:{name} (seed {seed})",
                      # the caller's device: on a CPU fp32, bit-reproducible; on a GPU bf16/fp16 (another cache key)
                      device=device, precision=precision)
    started = time.perf_counter()
    history = train(model, train_blocks, cfg, eval_data=evals)
    seconds = time.perf_counter() - started
    throughput = measured_throughput(model, tokens=rec.train_tokens, seconds=seconds, seq_len=rec.seq_len,
                                     precision=history.attrs.get("precision", "fp32"))

    # Export every kept step as a loadable model folder (safetensors + config + tokenizer).
    # A copy, not model.state_dict(): that returns the live tensors, which loading an intermediate
    # step would overwrite (zoo format 1 saved step-800's weights as "final" that way).
    from safetensors.torch import load_file

    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for step in (rec.steps,) + keep:
        folder = work / ("final" if step == rec.steps else f"step-{step}")
        if step != rec.steps:
            model.load_state_dict({**final,
                                   **load_file(str(work / "train" / f"step-{step}" / "trainable.safetensors"))})
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    model.load_state_dict(final)
    shutil.rmtree(work / "train")
    history.to_json(work / "history.json", orient="records")
    info = {"name": name, "seed": seed, "recipe": asdict(rec), "parameters": modeling.count_parameters(model),
            "train_tokens": int(rec.steps * rec.batch_size * rec.seq_len), "train_seconds": round(seconds, 1),
            "corpus_documents": len(texts["train"]), **throughput}
    (work / "info.json").write_text(json.dumps(info, indent=2))
    files = {str(p.relative_to(work)): sha256_file(p) for p in sorted(work.rglob("*")) if p.is_file()}
    atomic_write_text(work / "manifest.json", json.dumps({"files": files, "created": time.time()}, indent=1))
    if entry.exists():
        shutil.rmtree(entry)
    work.rename(entry)


def load(name: str, seed: int = 0, step: str | None = None, *, profile: str | None = None,
         progress: bool = True, **overrides):
    """``(model, tokenizer)`` of ``zoo:name`` (final weights, or an intermediate ``step``)."""
    from . import modeling

    entry = pretrain(name, seed, profile=profile, progress=progress, **overrides)
    folder = entry / ("final" if step in (None, "final") else step)
    if not folder.is_dir():
        kept = sorted(p.name for p in entry.iterdir() if p.name.startswith("step-")) + ["final"]
        raise modeling.ModelSpecError(f"zoo:{name} has no checkpoint {step!r}; kept: {', '.join(kept)}")
    return modeling.load_pretrained(folder)


def history(name: str, seed: int = 0, profile: str | None = None, **overrides):
    import pandas as pd

    entry = pretrain(name, seed, profile=profile, **overrides)
    return pd.read_json(entry / "history.json", orient="records")


def info(name: str, seed: int = 0, profile: str | None = None, **overrides) -> dict:
    entry = pretrain(name, seed, profile=profile, **overrides)
    return json.loads((entry / "info.json").read_text())


def checkpoints(name: str, seed: int = 0, profile: str | None = None, **overrides) -> list[str]:
    """Names of the kept checkpoints, in training order (``step-100``, ..., ``final``)."""
    entry = pretrain(name, seed, profile=profile, **overrides)
    steps = sorted(int(p.name.split("-")[1]) for p in entry.iterdir() if p.name.startswith("step-"))
    return [f"step-{s}" for s in steps] + ["final"]


def world_of(name: str, seed: int = 0, profile: str | None = None, **overrides) -> D.World:
    """The synthetic world a zoo model was pre-trained on (to probe what it knows)."""
    return world(recipe(name, profile, **overrides), seed)
