"""Where fine-tuning happens (chapter 10): which layers, how few parameters, and how far from the tangent space.

The task. A rule over a short list of digits, asked as an instruction the pre-training corpus never used
(``what is the largest of 3 9 4 ?``; the corpus only *narrates* such rules: "of the numbers 3 9 4 the largest is 9").
The answer is one digit, so every arm is a 10-way classifier read at the input's last token, in one of two ways:

* **prompt-based** (LM-BFF, Malladi et al.): the input ends in the cue ``answer :`` and the classes are the
  pre-trained output embeddings of the label words `` 0`` … `` 9`` — the language-modelling head, restricted;
* **head-based** ("standard" fine-tuning): no cue, and a new, randomly initialised linear head on the last hidden
  state — the setting of layer freezing (Lee et al.), transfer (Yosinski et al.) and LP-FT (Kumar et al.).

:class:`Classifier` is both (one module, one parameter naming); :func:`finetune` trains a copy with the book's loop
(:func:`ftbook.train.train`) and a ``trainable(name)`` filter that freezes the rest.

1. Layers: :func:`layer_units` lists the network bottom-up (embeddings, each block's attention and MLP),
   :func:`layer_unit` names the unit of a parameter, :func:`train_above` freezes the first *k*, :func:`transplant`
   copies the first *n* into a fresh network (Yosinski et al.).
2. Grafting (Panigrahi et al.): :func:`task_vector`, :func:`magnitude_mask`, :func:`random_mask`,
   :func:`learned_mask`, :func:`graft`, :func:`mask_overlap`.
3. The kernel view: :class:`ftbook.methods.ntk.Linearized` trained by the same recipe (:func:`kernel_run`).
4. LP-FT (Kumar et al.): :func:`probed` (the head set to the linear probe), :func:`feature_shift`.

The chapter's runs are jobs for :class:`ftbook.parallel.Pool` (:func:`layer_run`, :func:`probe_run`,
:func:`graft_run`, :func:`kernel_run`): each loads the base itself (:func:`load_base`, once per process).
"""
from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .. import data as D

RULES = ("max", "min", "first", "last")   # data.TASKS families whose answer is one digit of the list
ANSWER_CUE = "answer :"
DIGITS = tuple(str(d) for d in range(10))
TRAIN_PHRASINGS = (0, 1, 2)                # instruction wordings of data.TASKS used everywhere here


# --- the task --------------------------------------------------------------------------------------------------
@dataclass
class Examples:
    """Instructions (without the cue) and their digit labels."""

    instructions: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, n: int) -> Examples:
        return Examples(self.instructions[:n], self.labels[:n])

    def texts(self, prompt: bool) -> list[str]:
        """What the model reads: with the answer cue (prompt-based) or the bare instruction (head-based)."""
        return [f"{x} {ANSWER_CUE}" if prompt else x for x in self.instructions]

    def second_language(self) -> Examples:
        """The same examples in the world's second surface language (letters rotated; digits kept)."""
        return Examples([D.to_second_language(x) for x in self.instructions], list(self.labels))


def rule_examples(rules: Sequence[str], n: int, *, seed: int, split: str,
                  phrasings: Sequence[int] = TRAIN_PHRASINGS) -> Examples:
    """``n`` examples cycling through ``rules`` (each equally often), each in a random wording of ``phrasings``;
    ``split`` names an independent stream (``train`` / ``test`` / ...), deterministic in (rules, split, seed)."""
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(f"unknown rule {unknown[0]!r}; known: {', '.join(RULES)}")
    rng = random.Random(f"ch10-{','.join(rules)}-{split}-{seed}")
    instructions, labels = [], []
    for i in range(n):
        family = D.TASKS[rules[i % len(rules)]]
        args = family.sample(rng)
        instructions.append(family.instructions[rng.choice(list(phrasings))].format(**args))
        labels.append(int(args["answer"]))
    order = list(range(n))
    rng.shuffle(order)
    return Examples([instructions[i] for i in order], [labels[i] for i in order])


def encode(examples: Examples, tokenizer, seq_len: int, *, prompt: bool):
    """Rows for :func:`ftbook.train.train`: token ids padded on the right to ``seq_len``, the attention mask, and the
    label as a one-column ``labels`` (the loop wants 2-D columns). A text longer than ``seq_len`` raises."""
    import datasets

    pad = tokenizer.pad_token_id
    ids_rows, mask_rows = [], []
    texts = examples.texts(prompt)
    for text, ids in zip(texts, tokenizer(texts, add_special_tokens=False)["input_ids"]):
        if len(ids) > seq_len:
            raise ValueError(f"{text!r} has {len(ids)} tokens; seq_len={seq_len} is too short")
        ids_rows.append(ids + [pad] * (seq_len - len(ids)))
        mask_rows.append([1] * len(ids) + [0] * (seq_len - len(ids)))
    return datasets.Dataset.from_dict({"input_ids": ids_rows, "attention_mask": mask_rows,
                                       "labels": [[y] for y in examples.labels]}).with_format("numpy")


# --- the classifier ----------------------------------------------------------------------------------------------
class Classifier(nn.Module):
    """A causal LM read at each input's last real token (inputs padded on the right).

    ``label_ids`` given: prompt-based — the logits of those tokens under the LM's own output embedding.
    ``n_classes`` given: head-based — a new linear head (``head``), initialised from ``seed`` like a fresh head
    (normal, std 0.02, zero bias)."""

    def __init__(self, lm: nn.Module, *, label_ids: Sequence[int] | None = None, n_classes: int | None = None,
                 seed: int = 0):
        super().__init__()
        if (label_ids is None) == (n_classes is None):
            raise ValueError("give label_ids (prompt-based) or n_classes (a new head), not both")
        self.lm = lm
        self.head = None
        self.register_buffer("label_ids", torch.tensor(list(label_ids or []), dtype=torch.long), persistent=False)
        if n_classes is not None:
            width = lm.get_input_embeddings().weight.shape[1]
            generator = torch.Generator().manual_seed(seed)
            self.head = nn.Linear(width, n_classes)
            with torch.no_grad():
                self.head.weight.copy_(torch.randn(n_classes, width, generator=generator) * 0.02)
                self.head.bias.zero_()

    @property
    def prompt_based(self) -> bool:
        return self.head is None

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The last hidden state (after the final norm) at each row's last real token."""
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(1) - 1
        return hidden[torch.arange(len(input_ids), device=hidden.device), last]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.features(input_ids, attention_mask)
        if self.head is not None:
            return self.head(h)
        out = self.lm.get_output_embeddings()
        logits = h @ out.weight[self.label_ids].T
        return logits + out.bias[self.label_ids] if getattr(out, "bias", None) is not None else logits


def label_token_ids(tokenizer, words: Sequence[str] = DIGITS) -> list[int]:
    """The single token of each label word (with its leading space); a word of several tokens raises."""
    out = []
    for w in words:
        ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"label word {w!r} is {len(ids)} tokens in this vocabulary; "
                             "prompt-based scoring needs one")
        out.append(ids[0])
    return out


def classification_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy over the classes (the ``loss_fn`` of :func:`ftbook.train.train`)."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    return nn.functional.cross_entropy(logits.float(), batch["labels"][:, 0])


@torch.no_grad()
def predict_logits(model, data, *, batch_size: int = 256) -> torch.Tensor:
    """Logits (rows, classes) of a classifier — or of a :class:`ftbook.methods.ntk.Linearized` one."""
    from ..train import TensorData

    data = TensorData(data)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(data), batch_size):
            batch = data.batch(np.arange(start, min(len(data), start + batch_size)), device)
            out.append(model(batch["input_ids"], batch["attention_mask"]).float().cpu())
    finally:
        model.train(was)
    return torch.cat(out)


def accuracy(model, data) -> float:
    labels = torch.as_tensor(np.asarray(data["labels"])[:, 0])
    return float((predict_logits(model, data).argmax(1) == labels).float().mean())


def finetune(model: nn.Module, data, *, steps: int, lr: float, seed: int, batch_size: int = 16,
             trainable: Callable[[str], bool] | None = None, copy_model: bool = True, device: str = "cpu",
             precision: str = "fp32", weight_decay: float = 0.0, desc: str = "fine-tune") -> nn.Module:
    """Train (a copy of) ``model`` on the class labels with :func:`ftbook.train.train` (AdamW, warm-up over the first
    tenth, cosine decay); parameters for which ``trainable(name)`` is False are frozen. Returns the trained model."""
    from ..train import TrainConfig, train

    tuned = copy.deepcopy(model) if copy_model else model
    if trainable is not None:
        for name, p in tuned.named_parameters():
            p.requires_grad_(trainable(name))
    config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, warmup_steps=max(1, steps // 10), seed=seed,
                         weight_decay=weight_decay, device=device, precision=precision, progress=False, desc=desc)
    train(tuned, data, config, loss_fn=classification_loss)
    return tuned


# --- 1. layers: freezing and transfer ------------------------------------------------------------------------------
_BLOCK = re.compile(r"\.(?:layers|h)\.(\d+)\.")
_ATTENTION = {"self_attn", "attn", "attention", "input_layernorm", "ln_1"}  # Llama/Qwen, GPT-2, GPT-NeoX


def n_blocks(model: nn.Module) -> int:
    """How many transformer blocks the model has (the largest block index of its parameter names, plus one)."""
    found = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _BLOCK.search(n))]
    if not found:
        raise ValueError("no transformer blocks found (parameter names with '.layers.N.' or '.h.N.')")
    return max(found) + 1


def layer_units(model: nn.Module) -> list[str]:
    """The network bottom-up in units a freezing grid steps through: ``embeddings``, then each block's attention and
    its MLP (``0.attention``, ``0.mlp``, ``1.attention``, ...). The final norm and the head sit above them all."""
    return ["embeddings"] + [f"{b}.{part}" for b in range(n_blocks(model)) for part in ("attention", "mlp")]


def layer_unit(name: str) -> str:
    """The unit (see :func:`layer_units`) a parameter belongs to, or ``top`` for the final norm, the new head
    (``head.*``) and an untied output embedding (``lm_head``, GPT-NeoX's ``embed_out``); embeddings are everything
    else below the first block."""
    if name.startswith("head.") or "lm_head" in name or "embed_out" in name:
        return "top"
    found = _BLOCK.search(name)
    if found:
        sub = name[found.end():]
        return f"{found.group(1)}.{'attention' if sub.split('.')[0] in _ATTENTION else 'mlp'}"
    return "top" if "norm" in name or "ln_f" in name else "embeddings"


def block_boundaries(units: Sequence[str]) -> list[int]:
    """Unit counts that end at a block boundary: 0 (nothing), 1 (the embeddings), then after each whole block."""
    return [0] + [k for k in range(1, len(units) + 1) if units[k - 1] == "embeddings" or units[k - 1].endswith(".mlp")]


def train_above(units: Sequence[str], k: int) -> Callable[[str], bool]:
    """Freeze the first ``k`` units (``k=0``: nothing frozen; ``k=len(units)``: only the head and final norm train)."""
    frozen = set(units[:k])
    return lambda name: layer_unit(name) not in frozen


def train_below(units: Sequence[str], k: int) -> Callable[[str], bool]:
    """The mirror image: train the first ``k`` units (and the head and final norm), freeze the ones above."""
    trained = set(units[:k]) | {"top"}
    return lambda name: layer_unit(name) in trained


def transplant(pretrained: Classifier, fresh_lm: nn.Module, units: Sequence[str], n: int) -> Classifier:
    """Yosinski et al.'s transfer: a classifier on ``fresh_lm`` (randomly initialised, same architecture) whose first
    ``n`` units are copied from ``pretrained``; the rest, the final norm and the head stay fresh (the head: the same
    initial head as ``pretrained``'s, so arms differ only in the copied body)."""
    copied = set(units[:n])
    model = copy.deepcopy(pretrained)
    fresh = dict(fresh_lm.named_parameters())
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if layer_unit("lm." + name) not in copied:
                p.copy_(fresh[name])
    return model


# --- 2. grafting: how few parameters carry the skill ------------------------------------------------------------
def task_vector(tuned: nn.Module, base: nn.Module) -> dict[str, torch.Tensor]:
    """τ = θ_fine-tuned − θ_pre, per parameter (tied weights once)."""
    base_params = dict(base.named_parameters())
    return {n: (p.detach() - base_params[n].detach()) for n, p in tuned.named_parameters()}


def _top_fraction(scores: Mapping[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """Boolean masks marking the ``fraction`` of all entries with the largest scores (one global threshold)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    keep = torch.zeros(len(flat), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, max(1, round(fraction * len(flat)))).indices] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start:start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


def magnitude_mask(tau: Mapping[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """The ``fraction`` of parameters that moved most in fine-tuning (largest |τ|)."""
    return _top_fraction({n: t.abs() for n, t in tau.items()}, fraction)


def random_mask(tau: Mapping[str, torch.Tensor], fraction: float, *, seed: int) -> dict[str, torch.Tensor]:
    """A uniformly random ``fraction`` of the parameters: the control of the same size."""
    generator = torch.Generator().manual_seed(seed)  # drawn on the CPU: the same mask on any device
    return _top_fraction({n: torch.rand(t.shape, generator=generator).to(t.device) for n, t in tau.items()}, fraction)


def graft(base: nn.Module, tau: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``base`` with the fine-tuned values where ``mask`` is set: θ_pre + γ ⊙ τ (Panigrahi et al.)."""
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(tau[name].to(p.device) * mask[name].to(p.device, p.dtype))
    return model


def mask_overlap(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """|a ∧ b| / |a|: the share of one mask's parameters the other also picks (two random masks of fraction s
    overlap by about s)."""
    both = sum(int((a[n] & b[n]).sum()) for n in a)
    return both / max(1, sum(int(m.sum()) for m in a.values()))


def learned_mask(base: nn.Module, tau: Mapping[str, torch.Tensor], data, fraction: float, *, steps: int, lr: float,
                 seed: int, batch_size: int = 16, sigmoid_bias: float = 6.0) -> dict[str, torch.Tensor]:
    """Panigrahi et al.'s grafting mask, learned: start from the largest-|τ| ``fraction`` (the "base patch" s), relax
    the mask to γ = s + (1 − 2s) σ(S − b) with S = 0 (so γ ≈ s), descend the task loss of θ_pre + γ ⊙ τ on the training
    rows with respect to S, and keep the ``fraction`` of parameters with the largest γ — the same size as the start.

    As in the paper the step is plain gradient descent (the largest entry of the step is ``lr``), so a parameter's
    score moves in proportion to how much grafting it lowers the loss; Adam would move every score alike."""
    from torch.func import functional_call

    from ..train import TensorData, batch_indices

    rows = TensorData(data)
    device = next(base.parameters()).device
    start = {n: m.to(tau[n].device, tau[n].dtype) for n, m in magnitude_mask(tau, fraction).items()}
    theta = {n: p.detach() for n, p in base.named_parameters()}
    scores = {n: torch.zeros_like(t, requires_grad=True) for n, t in tau.items()}

    def relaxed(name):
        return start[name] + (1 - 2 * start[name]) * torch.sigmoid(scores[name] - sigmoid_bias)

    was = base.training
    base.eval()
    try:
        for step in range(steps):
            batch = rows.batch(batch_indices(len(rows), batch_size, step, seed), device)
            params = {n: theta[n] + relaxed(n) * tau[n] for n in tau}
            logits = functional_call(base, params, (batch["input_ids"], batch["attention_mask"]))
            grads = torch.autograd.grad(nn.functional.cross_entropy(logits.float(), batch["labels"][:, 0]),
                                        list(scores.values()))
            largest = max(float(g.abs().max()) for g in grads)
            with torch.no_grad():
                for s, g in zip(scores.values(), grads):
                    s -= lr * g / max(largest, 1e-30)
    finally:
        base.train(was)
    with torch.no_grad():
        return _top_fraction({n: relaxed(n) for n in tau}, fraction)


# --- 4. LP-FT: the head first, then everything --------------------------------------------------------------------
@torch.no_grad()
def features(model: Classifier, data, *, batch_size: int = 256) -> torch.Tensor:
    """The last hidden state each row's classifier reads (:meth:`Classifier.features`), in eval mode."""
    from ..train import TensorData

    rows = TensorData(data)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        return torch.cat([model.features(b["input_ids"], b["attention_mask"]).float().cpu()
                          for b in (rows.batch(np.arange(s, min(len(rows), s + batch_size)), device)
                                    for s in range(0, len(rows), batch_size))])
    finally:
        model.train(was)


def probed(model: Classifier, data, *, l2: float = 1e-3) -> Classifier:
    """A copy of a head-based classifier whose head is the linear probe on its frozen features
    (:class:`ftbook.evaluate.LinearProbe`, folded back from standardised to raw features): "LP", and LP-FT's start."""
    from ..evaluate import LinearProbe

    if model.head is None:
        raise ValueError("probing replaces a head: give a head-based classifier (n_classes=...)")
    probe = LinearProbe(model.head.out_features, l2=l2).fit(features(model, data), np.asarray(data["labels"])[:, 0])
    out = copy.deepcopy(model)
    with torch.no_grad():
        weight = (probe.weight / probe.scale[:, None]).T                        # (classes, width)
        out.head.weight.copy_(weight.to(out.head.weight.dtype))
        out.head.bias.copy_((probe.bias - (probe.mean / probe.scale) @ probe.weight).to(out.head.bias.dtype))
    return out


def feature_shift(before: Classifier, after: Classifier, data) -> float:
    """How far fine-tuning moved the features the head reads: mean ‖φ_after(x) − φ_before(x)‖ / ‖φ_before(x)‖."""
    a, b = features(before, data), features(after, data)
    return float(((b - a).norm(dim=1) / a.norm(dim=1).clamp_min(1e-12)).mean())


# --- the chapter's runs, as jobs for ftbook.parallel (each loads the base itself, once per process) --------------
@dataclass(frozen=True)
class Recipe:
    """The fine-tuning recipe an experiment's arms share."""

    steps: int
    lr: float
    batch_size: int = 16
    seq_len: int = 24
    device: str = "cpu"
    precision: str = "fp32"


_LOADED: dict = {}


def load_base(spec: str, seed: int, *, profile: str | None = None):
    """``(lm, tokenizer)`` of the chapter's base — ``zoo:base`` of this seed (a ``zoo:`` spec may carry recipe
    overrides, ``zoo:base?n_layer=6&d_model=64``), or a hub / local model — loaded once per process."""
    from .. import models, zoo

    key = (spec, seed, profile)
    if key not in _LOADED:
        _LOADED.clear()
        if spec.startswith("zoo:"):
            _, name, revision, query = models.parse_spec(spec)
            lm, tokenizer = zoo.load(name, seed, step=revision, profile=profile, progress=False, **query)
        else:
            lm, tokenizer = models.load(spec)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        _LOADED[key] = (lm, tokenizer)
    return _LOADED[key]


def _tune(start: nn.Module, rows, recipe: Recipe, seed: int, trainable=None) -> nn.Module:
    return finetune(start, rows, steps=recipe.steps, lr=recipe.lr, seed=seed, batch_size=recipe.batch_size,
                    trainable=trainable, device=recipe.device, precision=recipe.precision)


def layer_run(spec: str, seed: int, profile: str | None, sets: Mapping[str, Examples], recipe: Recipe, *,
              freeze: int = 0, random_body: bool = False, transplanted: int | None = None, frozen: bool = False,
              probe_first: bool = False, l2: float = 1e-3, finetune_seed: int | None = None) -> dict:
    """One head-based fine-tune of experiments 1 and 4, scored on ``sets['test']`` and the shifted ``sets['shifted']``.

    ``freeze=k``: the first ``k`` units of :func:`layer_units` frozen — of the pre-trained network, or of a randomly
    initialised one (``random_body``: the control for "frozen pre-trained layers are general"). ``transplanted=n``:
    Yosinski et al.'s transfer — a fresh network with the first ``n`` units copied from the base, those ``frozen`` or
    fine-tuned too. ``probe_first``: LP-FT — the head starts as the linear probe (:func:`probed`), then everything
    trains. ``finetune_seed`` (default ``seed``) draws the new head and the data order.
    Returns accuracies and how far the features moved (:func:`feature_shift`) on both test sets."""
    from ..modeling import from_config

    finetune_seed = seed if finetune_seed is None else finetune_seed
    lm, tokenizer = load_base(spec, seed, profile=profile)
    base = Classifier(lm, n_classes=10, seed=finetune_seed).to(recipe.device)
    rows = {k: encode(v, tokenizer, recipe.seq_len, prompt=False) for k, v in sets.items()}
    units = layer_units(base)
    trainable = train_above(units, freeze)
    start = base
    if random_body or transplanted is not None:
        fresh = from_config(lm.config, seed=seed + 1)
        start = transplant(base, fresh, units, transplanted or 0).to(recipe.device)
    if transplanted is not None:
        trainable = train_above(units, transplanted) if frozen else None
    elif probe_first:
        start, trainable = probed(base, rows["train"], l2=l2), None
    tuned = _tune(start, rows["train"], recipe, finetune_seed, trainable)
    return {"accuracy": accuracy(tuned, rows["test"]), "shifted": accuracy(tuned, rows["shifted"]),
            "shift_test": feature_shift(base, tuned, rows["test"]),
            "shift_shifted": feature_shift(base, tuned, rows["shifted"]),
            "trainable": sum(p.numel() for p in tuned.parameters() if p.requires_grad)}


def probe_run(spec: str, seed: int, profile: str | None, sets: Mapping[str, Examples], recipe: Recipe, *,
              l2: float = 1e-3) -> dict:
    """The linear probe on the base's frozen features (everything frozen but the head, trained to its optimum)."""
    lm, tokenizer = load_base(spec, seed, profile=profile)
    base = Classifier(lm, n_classes=10, seed=seed).to(recipe.device)
    rows = {k: encode(v, tokenizer, recipe.seq_len, prompt=False) for k, v in sets.items()}
    probe = probed(base, rows["train"], l2=l2)
    return {"accuracy": accuracy(probe, rows["test"]), "shifted": accuracy(probe, rows["shifted"]),
            "shift_test": 0.0, "shift_shifted": 0.0, "trainable": sum(p.numel() for p in base.head.parameters())}


def kernel_run(spec: str, seed: int, profile: str | None, train: Examples, test: Examples, recipe: Recipe, *,
               prompt: bool, linearized: bool) -> float:
    """Test accuracy after fine-tuning on ``train`` — the network itself or its linearization around the pre-trained
    weights (:class:`ftbook.methods.ntk.Linearized`, trained by the same recipe) — prompt-based or with a new head."""
    from ..methods.ntk import Linearized

    lm, tokenizer = load_base(spec, seed, profile=profile)
    model = (Classifier(lm, label_ids=label_token_ids(tokenizer)) if prompt else
             Classifier(lm, n_classes=10, seed=seed)).to(recipe.device)
    if linearized:
        model = Linearized(copy.deepcopy(model))
    rows = encode(train, tokenizer, recipe.seq_len, prompt=prompt)
    tuned = _tune(model, rows, recipe, seed)
    return accuracy(tuned, encode(test, tokenizer, recipe.seq_len, prompt=prompt))


def gain_share(score: float, base: float, tuned: float) -> float:
    """The share of fine-tuning's gain a model keeps: (score − base) / (tuned − base); NaN if fine-tuning gained
    nothing."""
    return float("nan") if tuned - base <= 0 else (score - base) / (tuned - base)


def graft_run(spec: str, seed: int, profile: str | None, train: Examples, test: Examples, recipe: Recipe, *,
              finetune_seed: int, fractions: Sequence[float], keep: float, mask_steps: int, mask_lr: float,
              mask_bias: float, random_seed: int) -> dict:
    """Experiment 2 for one fine-tune: prompt-based fine-tuning of the base, then grafts of its update at every
    fraction of ``fractions`` — the largest |τ|, a random mask (drawn from ``random_seed``) and the learned mask
    (:func:`learned_mask`). Returns base and fine-tuned accuracy, the curve, and the masks at fraction ``keep``."""
    lm, tokenizer = load_base(spec, seed, profile=profile)
    base = Classifier(lm, label_ids=label_token_ids(tokenizer)).to(recipe.device)
    rows, test_rows = (encode(x, tokenizer, recipe.seq_len, prompt=True) for x in (train, test))
    tuned = _tune(base, rows, recipe, finetune_seed)
    tau = task_vector(tuned, base)
    base_accuracy, tuned_accuracy = accuracy(base, test_rows), accuracy(tuned, test_rows)
    curve, kept = [], {}
    for fraction in fractions:
        masks = {"largest |τ|": magnitude_mask(tau, fraction),
                 "random": random_mask(tau, fraction, seed=random_seed),
                 "learned": learned_mask(base, tau, rows, fraction, steps=mask_steps, lr=mask_lr,
                                         seed=finetune_seed, sigmoid_bias=mask_bias)}
        for name, mask in masks.items():
            score = accuracy(graft(base, tau, mask), test_rows)
            curve.append({"fraction": fraction, "mask": name, "accuracy": score,
                          "gain kept": gain_share(score, base_accuracy, tuned_accuracy)})
        if np.isclose(fraction, keep):
            kept = masks
    return {"base": base_accuracy, "tuned": tuned_accuracy, "curve": curve, "masks": kept,
            "parameters": sum(t.numel() for t in tau.values())}


def mask_locations(mask: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """How many grafted parameters each unit of the network holds (embeddings, ``0.attention``, ..., ``top``)."""
    out: dict[str, int] = {}
    for name, m in mask.items():
        out[layer_unit(name)] = out.get(layer_unit(name), 0) + int(m.sum())
    return out

