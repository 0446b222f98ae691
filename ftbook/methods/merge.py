"""Model merging over state dicts: soups, WiSE-FT, task arithmetic, TIES, DARE, Fisher, RegMean, Model Stock.

Every method maps models with identical keys and shapes, ``θ_1 … θ_n`` (and often the pre-trained ``θ_0``
they were all fine-tuned from), to one set of weights ``θ*``. They differ in how much say each model gets,
weight by weight::

    uniform_soup      (1/n) Σ θ_i                                                Wortsman et al. 2022a
    greedy_soup       average of the ingredients that do not lower a held-out    Wortsman et al. 2022a
                      score, tried best-first
    interpolate       (1 − α) θ_0 + α θ_1  (WiSE-FT)                             Wortsman et al. 2022b
    task_arithmetic   θ_0 + λ Σ w_i τ_i,   τ_i = θ_i − θ_0                       Ilharco et al. 2023
    ties_merging      θ_0 + λ · disjoint_mean(elect_sign(trim_k(τ_i)))           Yadav et al. 2023
    dare              θ_0 + λ Σ w_i m_i ⊙ τ_i / (1 − p),  m_i ~ Bernoulli(1 − p) Yu et al. 2024
    fisher_merge      Σ_i w_i F_i θ_i / Σ_i w_i F_i  (diagonal Fisher, per entry) Matena & Raffel 2022
    regmean_merge     W* = (Σ G_i)⁻¹ Σ G_i W_i,  G_i = X_iᵀ X_i  (linear layers)  Jin et al. 2023
    model_stock       t θ̄ + (1 − t) θ_0,  t = k cos φ / (1 + (k − 1) cos φ)      Jang et al. 2024

Statistics they need: :func:`diagonal_fisher` (Fisher), :func:`collect_grams` (RegMean). Adapters:
:func:`lora_state_dict` folds a peft LoRA into a full state dict, after which any method applies.

Merging only works between models that sit in one basin of the loss: fine-tunes of the *same* pre-trained
weights (linear mode connectivity, Frankle et al. 2020; Neyshabur et al. 2020). Nothing here can check that;
averaging fine-tunes of different initialisations runs fine and gives a broken model (chapter 4 shows it).

**Memory.** Every function streams over keys: output tensor ``k`` is built from tensor ``k`` of each input,
so a merge holds the models it is given plus one output, plus temporaries of *one* key (about 2 copies of it
for sums and averages, n + 4 for TIES / DARE-TIES with n task vectors). Task vectors are lazy
(:class:`TaskVector` computes ``θ_i[k] − θ_0[k]`` when read), so passing n of them costs no memory;
:func:`greedy_soup` keeps one candidate soup at a time. Keys that share storage in the first (reference)
model — tied weights, e.g. ``embed_tokens`` and ``lm_head`` — are merged once and share storage in the
output, as in the model. Take state dicts with :func:`snapshot`, not ``model.state_dict()`` (which returns
the model's live tensors: loading a merge into the model would change them). Measured (4 models of
64 MiB, 16 keys of 4 MiB): peak RSS rose by 66 MiB for a soup, 75 for task arithmetic, 107 for TIES with
glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_=65536``); by up to 60 MiB more with the default
adaptive threshold (freed per-key temporaries stay in the heap).

**Precision and buffers.** float16 / bfloat16 tensors are merged in float32 and cast back; integer and bool
tensors (buffers, counters) are copied from the reference model.

**Bad input** (keys or shapes that differ, α / λ / p / density out of range, an empty list) raises one
``ValueError`` whose message starts with the argument's name.

**Conventions against peft** (``peft.utils.merge_utils``, which the unit tests compare with): TIES takes
``density`` = the fraction of each task vector kept (the paper's k, as a fraction), as in peft; DARE takes the
paper's drop rate ``p`` = 1 − peft's ``density``. As in peft, TIES and DARE-TIES elect signs from the
*unweighted* (trimmed or dropped) task vectors, and the disjoint mean divides the weighted sum by the *count*
of agreeing entries (mergekit elects from the weighted vectors and divides by the sum of the agreeing
weights; all three agree when every weight is 1). The trim keeps ``int(density · numel)`` entries per tensor,
as peft does. λ (``scaling``) multiplies the merged task vector; peft folds it into the weights.
"""
from __future__ import annotations

import copy
import math
import numbers
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]
SIGN_METHODS = ("total", "frequency")
FISHER_TARGETS = ("empirical", "sampled")
DARE_THEN = ("sum", "ties")


# --- checks ---------------------------------------------------------------------------------------------
def _as_list(models, argument: str, *, at_least: int = 1) -> list:
    """``models`` as a list of mappings, or a ValueError naming ``argument``."""
    if isinstance(models, Mapping) or isinstance(models, torch.Tensor):
        raise ValueError(f"{argument} must be a list of state dicts, got a single {type(models).__name__}")
    try:
        models = list(models)
    except TypeError:
        raise ValueError(f"{argument} must be a list of state dicts, got {type(models).__name__}") from None
    if not models:
        raise ValueError(f"{argument} is empty: give at least {at_least} state dict(s)")
    if len(models) < at_least:
        raise ValueError(f"{argument} needs at least {at_least} state dicts, got {len(models)}")
    for i, model in enumerate(models):
        if not isinstance(model, Mapping):
            raise ValueError(f"{argument}[{i}] must be a state dict (a mapping of names to tensors), "
                             f"got {type(model).__name__}")
    return models


def _shape(mapping: Mapping, key: str) -> tuple[int, ...]:
    if isinstance(mapping, TaskVector):
        return tuple(mapping.base[key].shape)  # without computing the difference
    return tuple(mapping[key].shape)


def _device(mapping: Mapping, key: str) -> torch.device:
    if isinstance(mapping, TaskVector):
        return mapping.base[key].device
    return mapping[key].device


def check_compatible(models: Sequence[Mapping], argument: str = "state_dicts", *,
                     reference: Mapping | None = None, reference_name: str | None = None,
                     indexed: bool = True) -> list[str]:
    """The keys of ``reference`` (default ``models[0]``), in its order, after checking that every model has
    exactly those keys with the same shapes; otherwise a ValueError naming ``argument`` (``argument[i]``
    when ``indexed``)."""
    if reference is None:
        reference, reference_name = models[0], reference_name or f"{argument}[0]"
    reference_name = reference_name or "the reference"
    keys = list(reference.keys())
    wanted = set(keys)
    for index, model in enumerate(models):
        if model is reference:
            continue
        i = index if indexed else None
        have = set(model.keys())
        if have != wanted:
            missing, extra = sorted(wanted - have), sorted(have - wanted)
            raise ValueError(f"{_at(argument, i)} does not have the keys of {reference_name}: "
                             f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, "
                             f"unexpected {extra[:3]}{' ...' if len(extra) > 3 else ''}")
        for key in keys:
            if _shape(model, key) != _shape(reference, key):
                raise ValueError(f"{_at(argument, i)}[{key!r}] has shape {list(_shape(model, key))}, "
                                 f"{reference_name} has {list(_shape(reference, key))}")
            if _device(model, key) != _device(reference, key):
                raise ValueError(f"{_at(argument, i)}[{key!r}] is on {_device(model, key)}, {reference_name} on "
                                 f"{_device(reference, key)}: merge state dicts on one device "
                                 f"(snapshot(model, device=...) copies a model's weights to one)")
    return keys


def _at(argument: str, index: int | None) -> str:
    return argument if index is None else f"{argument}[{index}]"


def _number(value, argument: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> float:
    """A finite real in the interval, or a ValueError naming ``argument`` and the interval."""
    interval = f"{'(' if low_open else '['}{'-inf' if low is None else low}, " \
               f"{'inf' if high is None else high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{argument} must be a finite number in {interval}, got {value!r}")
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)) or \
            high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{argument} must be in {interval}, got {value}")
    return value


def _weights(weights, n: int, argument: str = "weights", *, nonnegative: bool = False,
             normalise: bool = False) -> list[float]:
    """``n`` finite weights (default all 1), optionally non-negative and normalised to sum to 1."""
    if weights is None:
        weights = [1.0] * n
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    try:
        weights = list(weights)
    except TypeError:
        raise ValueError(f"{argument} must be a list of {n} numbers, got {weights!r}") from None
    if len(weights) != n:
        raise ValueError(f"{argument} must have one number per model ({n}), got {len(weights)}")
    weights = [_number(w, f"{argument}[{i}]", low=0.0 if nonnegative else None) for i, w in enumerate(weights)]
    if normalise:
        total = sum(weights)
        if total <= 0:
            raise ValueError(f"{argument} must not all be zero")
        weights = [w / total for w in weights]
    return weights


def _seed(seed, argument: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"{argument} must be an integer >= 0, got {seed!r}")
    return int(seed)


def _choice(value, argument: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{argument} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


# --- streaming over keys --------------------------------------------------------------------------------
def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _work(t: torch.Tensor) -> torch.Tensor:
    """The tensor in a precision fit for arithmetic (half precisions go to float32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _storage_id(t: torch.Tensor):
    if t.numel() == 0 or t.device.type == "meta":
        return None
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype


def _stream(reference: Mapping, keys: Iterable[str], merge_one: Callable[[str], torch.Tensor]) -> StateDict:
    """``{key: merge_one(key)}``, one key at a time; keys that alias a tensor of ``reference`` already seen
    (tied weights) get the same output tensor instead of a second merge."""
    out: StateDict = {}
    first_key_of: dict = {}
    for key in keys:
        ident = _storage_id(reference[key]) if not isinstance(reference, TaskVector) else None
        if ident is not None and ident in first_key_of:
            out[key] = out[first_key_of[ident]]
            continue
        if ident is not None:
            first_key_of[ident] = key
        out[key] = merge_one(key)
    return out


def snapshot(model: nn.Module, device: str | torch.device | None = None) -> StateDict:
    """A detached copy of ``model``'s state dict (tied tensors stay tied) — safe to keep while the model's
    weights are overwritten by a merge. ``device``: where the copy lives (default: where each weight is); merges
    need all their state dicts on one device."""
    state = model.state_dict()
    if device is None:
        return _stream(state, state.keys(), lambda k: state[k].detach().clone())
    return _stream(state, state.keys(), lambda k: state[k].detach().to(device, copy=True))


def load(model: nn.Module, state_dict: Mapping) -> nn.Module:
    """Copy ``state_dict`` into ``model``'s weights (strict: the keys must match) and return the model."""
    model.load_state_dict(state_dict, strict=True)
    return model


def scorer(model: nn.Module, metric: Callable[[nn.Module], float]) -> Callable[[Mapping], float]:
    """``score(state_dict) = metric(model with those weights)`` — one model reused for every candidate, as
    :func:`greedy_soup` wants."""
    def score(state_dict: Mapping) -> float:
        return float(metric(load(model, state_dict)))
    return score


def nbytes(state_dict: Mapping) -> int:
    """Bytes held by the tensors of ``state_dict`` (shared storage counted once)."""
    seen, total = set(), 0
    for tensor in state_dict.values():
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


# --- soups and interpolation ----------------------------------------------------------------------------
def average(state_dicts: Sequence[Mapping], weights: Sequence[float] | None = None) -> StateDict:
    """θ* = Σ_i w_i θ_i / Σ_i w_i  (weights ≥ 0, default equal)."""
    models = _as_list(state_dicts, "state_dicts")
    keys = check_compatible(models, "state_dicts")
    w = _weights(weights, len(models), nonnegative=True, normalise=True)

    def one(key):
        first = models[0][key]
        if not _is_float(first):
            return first.clone()
        acc = _work(first) * w[0]
        for wi, model in zip(w[1:], models[1:]):
            acc.add_(_work(model[key]), alpha=wi)
        return acc.to(first.dtype)

    return _stream(models[0], keys, one)


def uniform_soup(state_dicts: Sequence[Mapping]) -> StateDict:
    """The uniform soup (Wortsman et al. 2022a): θ* = (1/n) Σ_i θ_i."""
    return average(state_dicts)


@dataclass
class GreedySoup:
    """What :func:`greedy_soup` found: the soup, the ingredients it kept (indices into the list given, in the
    order added), its held-out score, every ingredient's own score, and each try."""
    state_dict: StateDict
    ingredients: list[int]
    score: float
    individual_scores: list[float]
    history: list[dict] = field(default_factory=list)


def greedy_soup(state_dicts: Sequence[Mapping], score: Callable[[Mapping], float], *,
                individual_scores: Sequence[float] | None = None) -> GreedySoup:
    """The greedy soup (Wortsman et al. 2022a, Algorithm 1).

    Sort the ingredients by held-out score, best first; the soup starts as the best one. For each next
    ingredient θ_i: if ``score(average(soup ∪ {θ_i})) ≥ score(average(soup))``, add it. The soup is never
    worse on held-out data than the best single ingredient (by construction, on the data ``score`` uses).

    ``score(state_dict) -> float``, higher is better (see :func:`scorer`). ``individual_scores``: the
    ingredients' own scores if already known (else ``score`` is called on each). Ties keep the given order.
    Memory: the inputs plus one candidate soup (rebuilt exactly from the ingredients at each try).
    """
    models = _as_list(state_dicts, "state_dicts")
    check_compatible(models, "state_dicts")
    if not callable(score):
        raise ValueError(f"score must be a callable score(state_dict) -> float, got {type(score).__name__}")
    if individual_scores is None:
        individual_scores = [float(score(model)) for model in models]
    individual_scores = _weights(individual_scores, len(models), "individual_scores")
    order = sorted(range(len(models)), key=lambda i: -individual_scores[i])
    ingredients, soup_score = [order[0]], individual_scores[order[0]]
    history = [{"candidate": order[0], "score": soup_score, "accepted": True}]
    soup = None  # the last candidate, if it was accepted (then it is the soup)
    for i in order[1:]:
        soup = None  # one candidate in memory at a time; an accepted soup is rebuilt at the end if needed
        candidate = average([models[j] for j in ingredients + [i]])
        candidate_score = float(score(candidate))
        accepted = candidate_score >= soup_score  # "does not drop": Algorithm 1 uses ≥
        history.append({"candidate": i, "score": candidate_score, "accepted": accepted})
        if accepted:
            ingredients.append(i)
            soup, soup_score = candidate, candidate_score
        del candidate
    if soup is None:
        soup = average([models[j] for j in ingredients])
    return GreedySoup(soup, ingredients, soup_score, list(individual_scores), history)


def interpolate(theta_0: Mapping, theta_1: Mapping, alpha: float) -> StateDict:
    """WiSE-FT (Wortsman et al. 2022b): θ_α = (1 − α) · θ_0 + α · θ_1,  α ∈ [0, 1].

    θ_0: the zero-shot / pre-trained weights, θ_1: the fine-tuned ones. α = 0 gives θ_0, α = 1 gives θ_1.
    """
    alpha = _number(alpha, "alpha", low=0.0, high=1.0)
    keys = check_compatible([theta_1], "theta_1", reference=theta_0, reference_name="theta_0",
                            indexed=False)

    def one(key):
        a, b = theta_0[key], theta_1[key]
        if not _is_float(a):
            return a.clone()
        return torch.lerp(_work(a), _work(b), alpha).to(a.dtype)

    return _stream(theta_0, keys, one)


wise_ft = interpolate


# --- task vectors -----------------------------------------------------------------------------------------
class TaskVector(Mapping):
    """A task vector τ = c · (θ_ft − θ_base) (Ilharco et al. 2023), computed key by key when read: holding
    one costs no memory. ``-τ`` negates it, ``λ * τ`` scales it; :meth:`materialize` makes a plain dict.

    Integer / bool tensors have no direction: their entries read as zeros (merges copy them from the base).
    """

    def __init__(self, finetuned: Mapping, base: Mapping, coefficient: float = 1.0, *, _checked: bool = False):
        if not _checked:
            if not isinstance(finetuned, Mapping):
                raise ValueError(f"finetuned must be a state dict, got {type(finetuned).__name__}")
            if not isinstance(base, Mapping):
                raise ValueError(f"base must be a state dict, got {type(base).__name__}")
            check_compatible([finetuned], "finetuned", reference=base, reference_name="base", indexed=False)
            coefficient = _number(coefficient, "coefficient")
        self.finetuned, self.base, self.coefficient = finetuned, base, coefficient

    def __getitem__(self, key: str) -> torch.Tensor:
        ft, base = self.finetuned[key], self.base[key]
        if not _is_float(base):
            return torch.zeros_like(base)
        delta = _work(ft) - _work(base)
        return delta if self.coefficient == 1.0 else delta.mul_(self.coefficient)

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __neg__(self) -> TaskVector:
        return TaskVector(self.finetuned, self.base, -self.coefficient, _checked=True)

    def __mul__(self, factor: float) -> TaskVector:
        factor = _number(factor, "factor")
        return TaskVector(self.finetuned, self.base, self.coefficient * factor, _checked=True)

    __rmul__ = __mul__

    def materialize(self) -> StateDict:
        return _stream(self.base, list(self.base), self.__getitem__)

    def __repr__(self) -> str:
        return f"TaskVector({len(self)} tensors, coefficient={self.coefficient})"


def task_vector(finetuned: Mapping, base: Mapping) -> TaskVector:
    """τ = θ_ft − θ_base (lazy: see :class:`TaskVector`)."""
    return TaskVector(finetuned, base)


def negate(tau: Mapping) -> Mapping:
    """−τ: adding it to the base *forgets* the task (task arithmetic's negation)."""
    if isinstance(tau, TaskVector):
        return -tau
    if not isinstance(tau, Mapping):
        raise ValueError(f"tau must be a task vector (a mapping of names to tensors), got {type(tau).__name__}")
    return {k: -v if _is_float(v) else v for k, v in tau.items()}


class _Deltas:
    """τ_1[key], …, τ_n[key], each computed when read (so a lazy task vector's difference exists only while
    one per-tensor step uses it)."""

    def __init__(self, task_vectors: Sequence[Mapping], key: str):
        self.task_vectors, self.key = task_vectors, key

    def __len__(self) -> int:
        return len(self.task_vectors)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for tau in self.task_vectors:
            yield _work(tau[self.key])


def _merge_deltas(base: Mapping, task_vectors, scaling: float,
                  merge_one: Callable[[str, _Deltas], torch.Tensor]) -> StateDict:
    """θ* = θ_base + λ · merge_one(key, [τ_1[key], …, τ_n[key]]), key by key (merge_one returns a new tensor)."""
    if not isinstance(base, Mapping):
        raise ValueError(f"base must be a state dict, got {type(base).__name__}")
    taus = _as_list(task_vectors, "task_vectors")
    keys = check_compatible(taus, "task_vectors", reference=base, reference_name="base")

    def one(key):
        b = base[key]
        if not _is_float(b):
            return b.clone()
        merged = merge_one(key, _Deltas(taus, key))
        return merged.mul_(scaling).add_(_work(b)).to(b.dtype)

    return _stream(base, keys, one)


# The per-tensor steps: each takes the n task vectors' tensors for one key (a list, as peft does, or any
# iterable with a length; each is read once) and returns a new tensor.
def weighted_sum(deltas: Iterable[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_i w_i τ_i."""
    out = None
    for w, delta in zip(weights, deltas):
        out = delta * w if out is None else out.add_(delta, alpha=w)
    return out


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES step 1: keep the ``int(density · numel)`` entries of largest magnitude, zero the rest."""
    if density >= 1.0:
        return delta
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.view(delta.shape)


def elect_sign(deltas: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES step 2: γ = sgn(Σ_i τ_i) per entry ("total": the sign with more mass; "frequency": the sign of
    more task vectors); ``deltas`` stacked on dim 0. A tie (0) elects +1, as in peft."""
    if method == "total":
        mass = deltas.sum(dim=0)
    elif method == "frequency":
        mass = deltas.sign().sum(dim=0)
    else:
        raise ValueError(f"sign_method must be one of {', '.join(map(repr, SIGN_METHODS))}, got {method!r}")
    return torch.where(mass >= 0, 1.0, -1.0).to(deltas.dtype)


def _disjoint_mean_(deltas: torch.Tensor, sign: torch.Tensor, weights: Sequence[float] | None) -> torch.Tensor:
    """:func:`disjoint_mean` that overwrites ``deltas`` (saves a copy of the stack)."""
    agree = torch.where(sign > 0, deltas > 0, deltas < 0)  # sgn(τ_i) = γ; a zero agrees with nobody
    if weights is not None:
        deltas.mul_(torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(
            -1, *([1] * (deltas.dim() - 1))))
    total = deltas.mul_(agree).sum(dim=0)
    return total.div_(agree.sum(dim=0, dtype=deltas.dtype).clamp_(min=1))


def disjoint_mean(deltas: torch.Tensor, sign: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """TIES step 3: τ_m = Σ_{i ∈ A} w_i τ_i / |A|, A = {i : sgn(τ_i) = γ} per entry (trimmed zeros are in
    no A); entries where A is empty stay 0. ``deltas`` stacked on dim 0."""
    return _disjoint_mean_(deltas.clone(), sign, weights)


def _stack(tensors: Iterable[torch.Tensor], n: int) -> torch.Tensor:
    """``torch.stack`` that holds only the stack and the tensor being copied in."""
    stacked = None
    for i, tensor in enumerate(tensors):
        if stacked is None:
            stacked = tensor.new_empty((n, *tensor.shape))
        stacked[i] = tensor
    return stacked


def ties_tensors(deltas: Iterable[torch.Tensor], weights: Sequence[float], density: float,
                 sign_method: str = "total") -> torch.Tensor:
    """TIES on one key: trim each τ_i to its top-``density`` magnitudes, elect signs, disjoint mean."""
    trimmed = _stack((trim(delta, density) for delta in deltas), len(weights))
    return _disjoint_mean_(trimmed, elect_sign(trimmed, sign_method), weights)


def dare_drop(delta: torch.Tensor, drop_rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE on one tensor (Yu et al. 2024): τ̃ = m ⊙ τ / (1 − p), m ~ Bernoulli(1 − p) per entry — the
    expectation is unchanged. (The same draws as peft's ``random_pruning`` under the same seed.)"""
    keep = 1.0 - drop_rate
    mask = torch.bernoulli(torch.full_like(delta, keep), generator=generator)
    return mask.mul_(delta).div_(keep)


def dare_tensors(deltas: Iterable[torch.Tensor], weights: Sequence[float], drop_rate: float,
                 generator: torch.Generator | None = None, then: str = "sum",
                 sign_method: str = "total") -> torch.Tensor:
    """DARE on one key: drop and rescale each τ_i (in order, from one generator), then either the weighted
    sum (``then="sum"``, peft's ``dare_linear``) or TIES' sign election and disjoint mean (``"ties"``,
    peft's ``dare_ties``)."""
    dropped = (dare_drop(delta, drop_rate, generator) for delta in deltas)
    if then == "sum":
        return weighted_sum(dropped, weights)
    stacked = _stack(dropped, len(weights))
    return _disjoint_mean_(stacked, elect_sign(stacked, sign_method), weights)


def _key_generator(seed: int, key: str, device) -> torch.Generator:
    """A generator for one key: its draws depend on (seed, key) only, not on which other keys exist."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    return generator


def task_arithmetic(base: Mapping, task_vectors: Sequence[Mapping], *, scaling: float = 1.0,
                    weights: Sequence[float] | None = None) -> StateDict:
    """Task arithmetic (Ilharco et al. 2023): θ* = θ_base + λ Σ_i w_i τ_i.

    Addition: several task vectors, weights 1. Negation: pass ``negate(τ)`` (or weight −1) to forget a task.
    λ = ``scaling`` ≥ 0 (the paper picks it on validation data, from [0, 1]); weights may be negative.
    """
    scaling = _number(scaling, "scaling", low=0.0)
    n = len(_as_list(task_vectors, "task_vectors"))
    w = _weights(weights, n)
    return _merge_deltas(base, task_vectors, scaling, lambda key, deltas: weighted_sum(deltas, w))


def ties_merging(base: Mapping, task_vectors: Sequence[Mapping], *, density: float = 0.2,
                 scaling: float = 1.0, weights: Sequence[float] | None = None,
                 sign_method: str = "total") -> StateDict:
    """TIES-merging (Yadav et al. 2023): θ* = θ_base + λ τ_m, where per tensor

    1. trim: τ̂_i = τ_i with all but its top-k% magnitudes set to 0 (``density`` = k/100, default 20%);
    2. elect: γ = sgn(Σ_i τ̂_i) (the sign with more total mass);
    3. disjoint merge: τ_m = mean of the τ̂_i (weighted by w_i) over the i whose sign agrees with γ.
    """
    scaling = _number(scaling, "scaling", low=0.0)
    density = _number(density, "density", low=0.0, high=1.0, low_open=True)
    sign_method = _choice(sign_method, "sign_method", SIGN_METHODS)
    n = len(_as_list(task_vectors, "task_vectors"))
    w = _weights(weights, n)
    return _merge_deltas(base, task_vectors, scaling,
                         lambda key, deltas: ties_tensors(deltas, w, density, sign_method))


def dare(base: Mapping, task_vectors: Sequence[Mapping], *, drop_rate: float = 0.9, seed: int = 0,
         scaling: float = 1.0, weights: Sequence[float] | None = None, then: str = "sum",
         sign_method: str = "total") -> StateDict:
    """DARE, drop and rescale (Yu et al. 2024): θ* = θ_base + λ · merge_i(m_i ⊙ τ_i / (1 − p)),
    m_i ~ Bernoulli(1 − p) per entry, p = ``drop_rate`` ∈ [0, 1).

    ``then="sum"``: task arithmetic of the dropped vectors; ``"ties"``: sign election and disjoint mean (DARE-
    TIES). The masks depend on (``seed``, key, task index) only: the same seed gives the same merge.
    """
    scaling = _number(scaling, "scaling", low=0.0)
    drop_rate = _number(drop_rate, "drop_rate", low=0.0, high=1.0, high_open=True)
    seed = _seed(seed)
    then = _choice(then, "then", DARE_THEN)
    sign_method = _choice(sign_method, "sign_method", SIGN_METHODS)
    n = len(_as_list(task_vectors, "task_vectors"))
    w = _weights(weights, n)

    def one(key, deltas):
        generator = _key_generator(seed, key, base[key].device)
        return dare_tensors(deltas, w, drop_rate, generator, then, sign_method)

    return _merge_deltas(base, task_vectors, scaling, one)


# The task-vector merges by name (e.g. for a chapter's method × task table; validate a knob against it).
TASK_VECTOR_MERGES: dict[str, Callable[..., StateDict]] = {
    "task_arithmetic": task_arithmetic,
    "ties": ties_merging,
    "dare": dare,
    "dare_ties": lambda base, task_vectors, **knobs: dare(base, task_vectors, then="ties", **knobs),
}


# --- Fisher-weighted averaging ----------------------------------------------------------------------------
def diagonal_fisher(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], *,
                    targets: str = "empirical", seed: int = 0) -> StateDict:
    """The diagonal Fisher information of a causal LM, per parameter:

        F_j = (1/N) Σ_n ( ∂ log p_θ(y_n | x_n) / ∂θ_j )²,   log p_θ(y | x) = Σ_t log p_θ(y_t | x_<t)

    over the N sequences of ``batches`` (dicts with ``input_ids``, optional ``attention_mask`` and
    ``labels``; -100 labels and padding carry no likelihood), one backward pass per sequence (the square of a
    batch gradient would add cross terms). ``targets="empirical"``: y = the data's tokens (the empirical
    Fisher); ``"sampled"``: y_t drawn from the model's own p_θ(· | x_<t) (the true Fisher, as Matena & Raffel
    use, estimated by one sample; ``seed`` fixes the draws).

    Returns float32 tensors keyed like ``model.state_dict()`` (tied parameters under each of their names;
    buffers have no Fisher). The model's mode, ``requires_grad`` flags and ``.grad`` are left unchanged.
    """
    targets = _choice(targets, "targets", FISHER_TARGETS)
    seed = _seed(seed)
    named = list(model.named_parameters(remove_duplicate=False))
    params, index_of = [], {}
    for _, p in named:
        if id(p) not in index_of:
            index_of[id(p)] = len(params)
            params.append(p)
    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    flags, was_training = [p.requires_grad for p in params], model.training
    generator, count = None, 0
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        device = params[0].device if params else None
        for batch in batches:
            input_ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = None if mask is None else mask.to(device)
            labels = batch.get("labels", input_ids).to(device)
            if mask is not None:  # padding carries no likelihood, whatever its label
                labels = labels.masked_fill(mask == 0, -100)
            for row in range(input_ids.shape[0]):
                target = labels[row:row + 1, 1:]
                valid = target != -100
                if not valid.any():
                    continue
                logits = model(input_ids=input_ids[row:row + 1],
                               attention_mask=None if mask is None else mask[row:row + 1]).logits
                log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)[valid]
                if targets == "sampled":
                    if generator is None:
                        generator = torch.Generator(device=log_probs.device).manual_seed(seed)
                    y = torch.multinomial(log_probs.detach().exp(), 1, generator=generator).squeeze(-1)
                else:
                    y = target[valid]
                log_likelihood = log_probs.gather(-1, y[:, None]).sum()
                grads = torch.autograd.grad(log_likelihood, params, allow_unused=True)
                for acc, g in zip(sums, grads):
                    if g is not None:
                        acc.add_(g.float().square())
                count += 1
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
        model.train(was_training)
    if count == 0:
        raise ValueError("batches: no sequence with a target token (all labels -100 or empty)")
    for acc in sums:
        acc.div_(count)
    return {name: sums[index_of[id(p)]] for name, p in named}


def fisher_merge(state_dicts: Sequence[Mapping], fishers: Sequence[Mapping], *,
                 weights: Sequence[float] | None = None, epsilon: float = 1e-6) -> StateDict:
    """Fisher-weighted averaging (Matena & Raffel 2022), elementwise:

        θ*_j = Σ_i w_i F_ij θ_ij / Σ_i w_i F_ij,   F_ij ← max(F_ij, ε)

    The floor ε (the reference code floors the Fisher the same way; the default here is 1e-6) makes an entry
    no model has information about the plain weighted average. Keys without a Fisher in every model (buffers) are
    averaged with weights w.
    """
    models = _as_list(state_dicts, "state_dicts")
    keys = check_compatible(models, "state_dicts")
    fishers = _as_list(fishers, "fishers")
    if len(fishers) != len(models):
        raise ValueError(f"fishers must have one Fisher per model ({len(models)}), got {len(fishers)}")
    w = _weights(weights, len(models), nonnegative=True, normalise=True)
    epsilon = _number(epsilon, "epsilon", low=0.0, low_open=True)
    for key in keys:
        present = [key in f for f in fishers]
        if any(present) and not all(present):
            raise ValueError(f"fishers[{present.index(False)}] has no entry for {key!r}, "
                             f"fishers[{present.index(True)}] has one")
        if all(present):
            for i, f in enumerate(fishers):
                if tuple(f[key].shape) != tuple(models[0][key].shape):
                    raise ValueError(f"fishers[{i}][{key!r}] has shape {list(f[key].shape)}, "
                                     f"the weights have {list(models[0][key].shape)}")
    for i, fisher in enumerate(fishers):
        unknown = [k for k in fisher if k not in models[0]]
        if unknown:
            raise ValueError(f"fishers[{i}] has keys the models lack: {unknown[:3]}")

    def one(key):
        first = models[0][key]
        if not _is_float(first):
            return first.clone()
        if key not in fishers[0]:
            acc = _work(first) * w[0]
            for wi, model in zip(w[1:], models[1:]):
                acc.add_(_work(model[key]), alpha=wi)
            return acc.to(first.dtype)
        numerator = denominator = None
        for wi, model, fisher in zip(w, models, fishers):
            f = fisher[key].float().clamp(min=epsilon) * wi
            term = f * _work(model[key])
            numerator = term if numerator is None else numerator.add_(term)
            denominator = f if denominator is None else denominator.add_(f)
        return (numerator / denominator).to(first.dtype)

    return _stream(models[0], keys, one)


# --- RegMean ----------------------------------------------------------------------------------------------
class Grams(dict):
    """Weight key → the Gram matrix G = XᵀX / N of the inputs X (N rows) of that linear layer.
    ``in_first``: the keys whose weight is stored [in, out] (transformers' ``Conv1D``, GPT-2) rather than
    nn.Linear's [out, in]."""

    def __init__(self, *args, in_first: Iterable[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.in_first = set(in_first)


def _linear_modules(model: nn.Module) -> list[tuple[str, nn.Module, bool]]:
    """(name, module, weight stored [in, out]) of the linear layers whose weight is not tied to another
    parameter (a tied output layer is also the embedding: RegMean's formula does not apply to it)."""
    # transformers' Conv1D, if transformers is loaded (if it is not, no module can be one: no import needed)
    Conv1D = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", ())
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)) and uses.get(id(module.weight), 0) == 1:
            found.append((name, module, not isinstance(module, nn.Linear)))
    return found


@torch.no_grad()
def collect_grams(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]) -> Grams:
    """RegMean's statistics: for every linear layer (nn.Linear, Conv1D; not a weight tied to the embedding),
    G = XᵀX / N over the N token positions of ``batches`` that are not padding (``attention_mask``),
    gathered by forward hooks. Keyed by the layer's weight name, float32."""
    layers = _linear_modules(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    current_mask: list = [None]

    def hook_for(name):
        def hook(module, inputs, output):
            x = inputs[0].detach()
            mask = current_mask[0]
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1]).float()
            gram = (x.T @ x).double()
            sums[name] = gram if name not in sums else sums[name].add_(gram)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [module.register_forward_hook(hook_for(f"{name}.weight")) for name, module, _ in layers]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        for batch in batches:
            mask = batch.get("attention_mask")
            current_mask[0] = None if mask is None else mask.to(device)
            model(input_ids=batch["input_ids"].to(device), attention_mask=current_mask[0])
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not counts or not any(counts.values()):
        raise ValueError("batches: no token reached a linear layer (empty batches?)")
    grams = {key: (sums[key] / max(1, counts[key])).float() for key in sums}
    return Grams(grams, in_first={f"{name}.weight" for name, _, first in layers if first})


def _solve_right(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """X with X A = B for a symmetric A (least squares when A is singular)."""
    try:
        return torch.linalg.solve(a, b.T).T
    except RuntimeError:  # singular: the pseudo-inverse
        return b @ torch.linalg.pinv(a, hermitian=True)


def regmean_merge(state_dicts: Sequence[Mapping], grams: Sequence[Mapping], *, alpha: float = 1.0) -> StateDict:
    """RegMean (Jin et al. 2023): the linear layer closest to every model's outputs on its own inputs,

        W* = argmin_W Σ_i ‖X_i W − X_i W_i‖²  =  (Σ_i G_i)⁻¹ Σ_i G_i W_i,   G_i = X_iᵀ X_i

    (W as [in, out], as in the paper; nn.Linear stores Wᵀ). ``alpha`` ∈ [0, 1] scales the off-diagonal of
    every G_i, G̃ = α G + (1 − α) diag(G) — the paper's fix for ill-conditioned Grams; α = 1 is the formula
    above, α = 0 a per-input-feature weighted average. Keys without a Gram (embeddings, norms, biases) get
    the simple average. ``grams[i]``: :func:`collect_grams` of model i on its own data (run it on a plain
    model, e.g. after :func:`lora_state_dict`, so that the keys match). collect_grams divides XᵀX by the
    number of tokens, so each model weighs the same whatever its data size (the paper sums; the two agree
    for equal sizes). The paper tunes α on validation data.
    """
    models = _as_list(state_dicts, "state_dicts")
    keys = check_compatible(models, "state_dicts")
    grams = _as_list(grams, "grams")
    if len(grams) != len(models):
        raise ValueError(f"grams must have one entry per model ({len(models)}), got {len(grams)}")
    alpha = _number(alpha, "alpha", low=0.0, high=1.0)
    in_first = set(getattr(grams[0], "in_first", ()))
    names = set(grams[0])
    for i, g in enumerate(grams):
        if set(g) != names:
            raise ValueError(f"grams[{i}] covers other layers than grams[0]: "
                             f"{sorted(set(g) ^ names)[:3]}")
    for key in names:
        if key not in models[0]:
            raise ValueError(f"grams[0] has {key!r}, which the state dicts lack")
        shape = tuple(models[0][key].shape)
        n_in = shape[0] if key in in_first else shape[-1]
        for i, g in enumerate(grams):
            if tuple(g[key].shape) != (n_in, n_in):
                raise ValueError(f"grams[{i}][{key!r}] has shape {list(g[key].shape)}, expected "
                                 f"[{n_in}, {n_in}] for a weight of shape {list(shape)}")

    def one(key):
        first = models[0][key]
        if not _is_float(first):
            return first.clone()
        if key not in names:
            acc = _work(first) * (1.0 / len(models))
            for model in models[1:]:
                acc.add_(_work(model[key]), alpha=1.0 / len(models))
            return acc.to(first.dtype)
        gram_sum = weighted = None
        for model, g in zip(models, grams):
            gram = g[key].double()
            if alpha != 1.0:
                gram = alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))
            weight = model[key].double()
            term = gram @ weight if key in in_first else weight @ gram  # G W  (or Wᵀ G for [out, in])
            gram_sum = gram if gram_sum is None else gram_sum + gram
            weighted = term if weighted is None else weighted.add_(term)
        if key in in_first:
            merged = _solve_right(gram_sum, weighted.T).T  # (Σ G)⁻¹ Σ G W
        else:
            merged = _solve_right(gram_sum, weighted)  # (Σ W_i G_i)(Σ G_i)⁻¹
        return merged.to(first.dtype)

    return _stream(models[0], keys, one)


# --- Model Stock ------------------------------------------------------------------------------------------
def model_stock(base: Mapping, finetuned: Sequence[Mapping], *,
                return_ratios: bool = False) -> StateDict | tuple[StateDict, dict[str, float]]:
    """Model Stock (Jang et al. 2024), per tensor (the paper's "layer"), for k ≥ 2 fine-tunes of ``base``:

        cos φ = mean_{i<j} cos(θ_i − θ_0, θ_j − θ_0),   t = k cos φ / (1 + (k − 1) cos φ),
        θ* = t · θ̄ + (1 − t) · θ_0,   θ̄ = (1/k) Σ θ_i

    The less the fine-tunes agree (small cos φ), the further the merge moves back toward the base. cos φ is
    clamped to [0, 1] (the paper's geometry assumes a positive angle; the reference code leaves negative
    values, which give t < 0 or an exploding ratio). A tensor no fine-tune changed keeps θ_0.
    ``return_ratios``: also return ``{key: t}``.
    """
    if not isinstance(base, Mapping):
        raise ValueError(f"base must be a state dict, got {type(base).__name__}")
    models = _as_list(finetuned, "finetuned", at_least=2)
    keys = check_compatible(models, "finetuned", reference=base, reference_name="base")
    k = len(models)
    ratios: dict[str, float] = {}

    def one(key):
        b = base[key]
        if not _is_float(b):
            return b.clone()
        b32 = _work(b).float()
        deltas = _stack((_work(m[key]).float() - b32 for m in models), k).reshape(k, -1)
        norms = deltas.norm(dim=1)
        cosines = []
        for i in range(k):
            for j in range(i + 1, k):
                denom = norms[i] * norms[j]
                cosines.append(float((deltas[i] @ deltas[j]) / denom) if denom > 0 else 0.0)
        cos = min(1.0, max(0.0, sum(cosines) / len(cosines)))
        t = k * cos / (1 + (k - 1) * cos)
        ratios[key] = t
        mean_delta = deltas.mean(dim=0).reshape(b.shape)
        return (b32 + t * mean_delta).to(b.dtype)  # t θ̄ + (1 − t) θ_0 = θ_0 + t (θ̄ − θ_0)

    merged = _stream(base, keys, one)
    return (merged, ratios) if return_ratios else merged


# --- LoRA adapters ----------------------------------------------------------------------------------------
def lora_state_dict(model: nn.Module, adapter=None) -> StateDict:
    """A peft LoRA (or IA3) fine-tune as a full state dict, W + (α/r)·B A folded into each adapted weight
    (``merge_and_unload``), so that any merge above applies to adapters.

    ``model``: a ``PeftModel`` (``adapter=None``), or the base model and ``adapter`` a saved adapter folder.
    The models given are not changed: the merge happens on a copy, which becomes the output.
    """
    from peft import PeftModel

    if adapter is None:
        if not isinstance(model, PeftModel):
            raise ValueError("model must be a peft PeftModel when no adapter folder is given, "
                             f"got {type(model).__name__}")
        work = copy.deepcopy(model)
    else:
        if isinstance(model, PeftModel):
            raise ValueError("model must be the base model (not a PeftModel) when an adapter folder is given")
        work = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter))
    merged = work.merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}
