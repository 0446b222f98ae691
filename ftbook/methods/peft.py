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

LoRA on a causal LM (no classification head) goes through the same :func:`apply`: :func:`with_lora` wraps a *copy*
of a model with every projection of a Llama/Qwen block adapted (Biderman et al.'s setting). The classification
setting the methods are compared in (heads, pooling, tasks) is chapter 2's lab, :mod:`ftbook.labs.ch02_adapters`.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..modeling import LLAMA_LINEAR_LAYERS

# What :func:`with_lora` adapts: every linear layer of a Llama/Qwen block, as Biderman et al. recommend.
LORA_TARGETS = LLAMA_LINEAR_LAYERS
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
    if mc.method == "prefix" and not takes_past_key_values(model):
        raise ConfigError("method", f"prefix tuning hands its key/value prefix to the model as past key values, and "
                                    f"{type(model).__name__} takes none, nor does its backbone: leave 'prefix' out "
                                    f"of the methods for this model")
    if mc.method == "bottleneck":
        positive_int("bottleneck_size")
    if head_name(model) is None and (mc.method == "head" or mc.train_head):
        raise ConfigError("method", f"the model has no classification head ({', '.join(HEAD_NAMES)}); "
                          f"build it with ftbook.labs.ch02_adapters.classifier")
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


def head_name(model) -> str | None:
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

    task = "SEQ_CLS" if head_name(model) else "CAUSAL_LM"
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


def takes_past_key_values(model) -> bool:
    """Whether prefix tuning can reach ``model``'s attention: its forward (or its backbone's, as peft looks) takes
    ``past_key_values`` — or ``cache``, which :func:`_accept_past_key_values` maps the old name onto."""
    import inspect

    modules = [model, getattr(model, getattr(model, "base_model_prefix", ""), None)]
    for module in modules:
        if module is not None:
            params = inspect.signature(type(module).forward).parameters
            if "past_key_values" in params or "cache" in params:
                return True
    return False


def _forward_with_past_key_values(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                                  past_key_values=None, **kwargs):
    if past_key_values is not None:
        kwargs["cache"] = past_key_values
    return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                              labels=labels, **kwargs)


def _forward_with_cache(self, *args, past_key_values=None, **kwargs):
    if past_key_values is not None:
        kwargs["cache"] = past_key_values
    return type(self).forward(self, *args, **kwargs)


def _accept_past_key_values(model) -> None:
    """peft 0.21 hands prefix tuning's key/value prefix over as ``past_key_values``; transformers 5 renamed
    that argument ``cache`` — in Llama-style models, and in the backbone of encoders (RoBERTa, BERT), whose
    classification models take neither. Give the model (or, for an encoder, its backbone, which peft calls then) a
    forward that accepts the old name (a bound method, so ``copy.deepcopy`` rebinds it to the copy). A no-op for
    models that still take it."""
    import inspect
    import types

    params = inspect.signature(type(model).forward).parameters
    if "past_key_values" in params:
        return
    if "cache" in params:
        model.forward = types.MethodType(_forward_with_past_key_values, model)
        return
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if backbone is not None:
        inner = inspect.signature(type(backbone).forward).parameters
        if "past_key_values" not in inner and "cache" in inner:
            backbone.forward = types.MethodType(_forward_with_cache, backbone)


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
    head = head_name(model)
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


def with_lora(model, rank: int, *, alpha: float | None = None, targets: Sequence[str] = LORA_TARGETS,
              dropout: float = 0.0, seed: int = 0):
    """A LoRA-wrapped *copy* of a causal LM ``model`` (no classification head), adapting the ``targets`` layers.

    ``alpha`` defaults to ``2 * rank`` (Biderman et al.'s setting), so the update's scale alpha / r = 2 does not
    change with the rank. Only the adapters train; the copy's base weights stay frozen. The same :func:`apply` as
    every other method, with no head to train.
    """
    mc = MethodConfig("lora", rank=rank, alpha=alpha, dropout=dropout, target_modules=tuple(targets), train_head=False)
    return apply(copy.deepcopy(model), mc, seed=seed)


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
    from ..train import load_trainable

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


