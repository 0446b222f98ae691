"""Continual pre-training: domains, replay mixing, the arms of Ibrahim et al., the stability gap, DAPT/TAPT.

The setting (chapter 3). A model pre-trained on a *general* domain A is continued on a *specialist* domain B:

* A — real text of several kinds (news editorials, tweets, product and movie reviews, chat answers);
* B — an encyclopaedia of a synthetic world: people and their facts, stated only in B's corpus, plus a little
  procedural prose. B carries *knowledge* A does not have, which is what domain-adaptive pre-training exploits;
* M — a matched control domain: the same kind of encyclopaedia about other people (:func:`control_world`), the
  control of the DAPT comparison (it shares B's form, not its facts).

Pieces:

* :func:`replay_mix` — new-domain blocks with a fraction of old-domain blocks mixed in (Ibrahim et al.'s replay);
* :class:`Arm` / :func:`continual_arms` / :func:`arm_config` — the schedules compared at equal compute;
* :func:`stability_gap` — rise, peak and recovery of a loss curve (Guo et al.);
* :class:`KnowledgeTask` — a downstream question-answering task about B's people, whose answers are stated only
  in B's corpus; :func:`task_documents` is its unlabelled text (TAPT: its training facts only),
  :func:`finetune_and_score` fine-tunes a
  copy of a model on its labelled questions and scores the held-out ones.
"""
from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import data as D

GENERAL_DOMAINS = ("nyt_editorials", "tweets", "amazon_reviews", "movie_reviews", "chatterbot")
UNRELATED_DOMAIN = "jargon"


# --- domains -----------------------------------------------------------------------------------------
def specialist_world(seed: int, n_entities: int = 48) -> D.World:
    """Domain B's world: people the general corpus never mentions (a seed space apart from the zoo's)."""
    return D.World(seed=10_000 + seed, n_entities=n_entities)


def control_world(seed: int, n_entities: int = 48) -> D.World:
    """The matched control domain's world: the same kind of encyclopaedia about *other* people (another seed space),
    so adapting to it teaches everything DAPT teaches except the task's facts."""
    return D.World(seed=20_000 + seed, n_entities=n_entities)


def specialist_documents(world: D.World, n_docs: int, *, seed: int, task_fraction: float = 0.2) -> list[str]:
    """Domain B's corpus: biographies and fact sentences (several phrasings) and some procedural prose.

    No question/answer text and no second language: B states its facts only declaratively, so a model can
    answer questions about them only by *extracting* what it stored (the downstream task asks).
    """
    return D.world_documents(world, n_docs, seed=seed, second_language_fraction=0.0, qa_fraction=0.0,
                             task_fraction=task_fraction)


def general_texts(split: str, names: Sequence[str] = GENERAL_DOMAINS, *, seed: int = 0) -> list[str]:
    """Domain A: the real-text corpora of ``names`` (their ``split``), interleaved in a seeded order."""
    from .. import corpora

    texts = [t for name in names for t in corpora.texts(name, split)]
    random.Random(f"general-{split}-{seed}").shuffle(texts)
    return texts


def general_domain(spec: str, split: str, *, seed: int = 0, max_docs: int | None = None) -> list[str]:
    """Domain A's documents: ``'vader'`` = the shipped real-text mix, else a hub dataset (:func:`ftbook.hub.texts`)."""
    if spec == "vader":
        return general_texts(split, seed=seed)[:max_docs]
    from .. import hub

    return hub.texts(spec, split, max_docs=max_docs)


# --- replay --------------------------------------------------------------------------------------------
def replay_mix(new, old, replay_fraction: float, *, seed: int):
    """Blocks of ``new`` plus old-domain blocks so that ``replay_fraction`` of all blocks are old.

    Ibrahim et al. replay a fixed share of every batch from the old data *within* the same budget: at equal
    steps, a 5 % replay run sees 5 % fewer new-domain tokens. The training loop draws batches by a seeded
    permutation, so each batch holds the replay share in expectation. Old blocks are drawn without
    replacement (with replacement only if more are asked for than exist).
    """
    import datasets

    if not 0 <= replay_fraction < 1:
        raise ValueError(f"replay_fraction must be in [0, 1), got {replay_fraction}")
    new_ids = np.asarray(new["input_ids"])
    if replay_fraction == 0:
        return datasets.Dataset.from_dict({"input_ids": new_ids}).with_format("numpy")
    old_ids = np.asarray(old["input_ids"])
    if old_ids.shape[1] != new_ids.shape[1]:
        raise ValueError(f"old and new blocks differ in length ({old_ids.shape[1]} vs {new_ids.shape[1]})")
    n_old = max(1, round(replay_fraction / (1 - replay_fraction) * len(new_ids)))
    rng = np.random.default_rng([seed, 7919])
    pick = rng.choice(len(old_ids), size=n_old, replace=n_old > len(old_ids))
    rows = np.concatenate([new_ids, old_ids[pick]])
    return datasets.Dataset.from_dict({"input_ids": rows}).with_format("numpy")


def union(a, b, *, seed: int):
    """All blocks of both domains, shuffled: the from-scratch baseline's data."""
    import datasets

    rows = np.concatenate([np.asarray(a["input_ids"]), np.asarray(b["input_ids"])])
    rows = rows[np.random.default_rng([seed, 104729]).permutation(len(rows))]
    return datasets.Dataset.from_dict({"input_ids": rows}).with_format("numpy")


# --- arms ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    """One way to continue pre-training: re-warm the learning rate or not, and how much old data to replay."""

    name: str
    rewarm: bool
    replay_fraction: float = 0.0


def continual_arms(replay_fractions: Sequence[float] = (0.01, 0.05, 0.25)) -> list[Arm]:
    """No re-warm (constant, low lr); re-warm + re-decay; re-warm + re-decay + each replay fraction."""
    arms = [Arm("constant low lr", rewarm=False), Arm("re-warm + re-decay", rewarm=True)]
    arms += [Arm(f"re-warm + {f:.0%} replay", rewarm=True, replay_fraction=f) for f in replay_fractions]
    return arms


def arm_config(arm: Arm, *, steps: int, peak_lr: float, min_lr: float, rewarm_steps: int, **train_kwargs):
    """The :class:`~ftbook.train.TrainConfig` of an arm.

    No re-warm: the pre-training run's final (minimum) lr, held constant. Re-warm: linear warm-up from ~0 to
    the pre-training peak over ``rewarm_steps``, then cosine re-decay to the same minimum (Ibrahim et al.).
    """
    from ..train import TrainConfig

    if arm.rewarm:
        return TrainConfig(steps=steps, lr=peak_lr, warmup_steps=rewarm_steps, schedule="cosine",
                           min_lr_ratio=min_lr / peak_lr, **train_kwargs)
    return TrainConfig(steps=steps, lr=min_lr, warmup_steps=0, schedule="constant", **train_kwargs)


# --- measuring during training ------------------------------------------------------------------------
def eval_schedule(steps: int, dense_until: float = 0.3, dense_points: int = 8, sparse_points: int = 6) -> list[int]:
    """Evaluation steps for a run of ``steps``: dense early (where the stability gap lives), sparse later."""
    cut = max(1, round(dense_until * steps))
    dense = np.linspace(0, cut, dense_points + 1)
    sparse = np.linspace(cut, steps, sparse_points + 1)
    return sorted({int(round(x)) for x in np.concatenate([dense, sparse])})


class LossTracker:
    """An ``on_step`` callback for :func:`ftbook.train.train` that logs each eval set's loss at chosen steps.

    Cheaper than evaluating every N steps: the stability gap needs resolution early, not late.
    ``frame()`` returns one row per evaluated step (step 0 = before training, measured at construction).
    """

    def __init__(self, model, eval_sets: dict, steps: Sequence[int]):
        self.eval_sets, self.steps, self.rows = eval_sets, set(steps), []
        if 0 in self.steps:
            self(0, model)

    def __call__(self, step: int, model) -> None:
        if step in self.steps:
            from ..train import evaluate_loss

            self.rows.append({"step": step, **{name: evaluate_loss(model, data) for name,
                                               data in self.eval_sets.items()}})

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)


def continue_pretraining(base, data, train_config, eval_sets: dict, eval_steps: Sequence[int] | None = None):
    """Train a *copy* of ``base`` on ``data``; returns ``(model, curve)`` where ``curve`` has one row per step in
    ``eval_steps`` (default: :func:`eval_schedule`) and one column per eval set."""
    from ..train import train

    model = copy.deepcopy(base)
    tracker = LossTracker(model, eval_sets, eval_steps if eval_steps is not None else eval_schedule(train_config.steps))
    history = train(model, data, train_config, on_step=tracker)
    curve = tracker.frame()
    curve.attrs["seconds"] = float(history["seconds"].iloc[-1]) if len(history) else 0.0
    return model, curve


def pretrain_from_scratch(model_config, data, train_config):
    """A fresh model of ``model_config`` (initialised from ``train_config.seed``) trained on ``data``."""
    from ..modeling import from_config
    from ..train import train

    model = from_config(model_config, seed=train_config.seed)
    train(model, data, train_config)
    return model


# --- the stability gap ---------------------------------------------------------------------------------
def stability_gap(steps: Sequence[float], losses: Sequence[float]) -> dict:
    """Shape of an old-domain loss curve during continual training (``steps[0]`` = before it starts).

    ``rise`` = peak − start (how much is lost), ``recovery`` = peak − end (how much comes back after the
    peak), ``recovered_fraction`` = recovery / rise, ``peak_at`` = the peak's position in [0, 1] of the run.
    """
    steps = np.asarray(steps, dtype=float)
    losses = np.asarray(losses, dtype=float)
    if len(steps) != len(losses) or len(losses) < 2:
        raise ValueError("need at least two (step, loss) points of equal count")
    i = int(np.argmax(losses))
    span = steps[-1] - steps[0]
    rise = float(losses[i] - losses[0])
    recovery = float(losses[i] - losses[-1])
    return {"start": float(losses[0]), "peak": float(losses[i]), "end": float(losses[-1]),
            "peak_step": float(steps[i]), "peak_at": float((steps[i] - steps[0]) / span) if span else 0.0,
            "rise": rise, "recovery": recovery,
            "recovered_fraction": recovery / rise if rise > 0 else 0.0}


def forgetting_undone(before: float, without_replay: float, with_replay: float) -> float:
    """Share of the old-domain forgetting (loss increase without replay) that replay removes."""
    forgot = without_replay - before
    return (without_replay - with_replay) / forgot if forgot > 0 else float("nan")


# --- the downstream task: questions about the specialist domain's people ------------------------------
@dataclass
class KnowledgeTask:
    """Questions about some of B's people. The answers are stated in B's corpus and nowhere else.

    ``train`` facts are the labelled fine-tuning set, ``test`` facts are held out (other facts of the same
    people); ``unstated`` facts were never written into B's corpus (a control: nothing can know them).
    """

    entities: list[str]
    train: list[D.Fact]
    test: list[D.Fact]
    unstated: list[D.Fact] = field(default_factory=list)


def knowledge_task(world: D.World, n_entities: int, *, seed: int, train_fraction: float = 0.3) -> KnowledgeTask:
    rng = random.Random(f"task-{seed}")
    entities = sorted(rng.sample(world.entities, min(n_entities, len(world.entities))))
    chosen = set(entities)
    stated = [f for f in world.seen_facts() if f.entity in chosen]
    rng.shuffle(stated)
    n_train = round(train_fraction * len(stated))
    unstated = [f for f in world.unseen_facts() if f.entity in chosen]
    return KnowledgeTask(entities, stated[:n_train], stated[n_train:], unstated)


def encode_qa(facts: Sequence[D.Fact], tokenizer, seq_len: int):
    """Fine-tuning rows ``q : <question> a : <answer>`` with the loss on the answer only."""
    return D.encode_instructions(D.question_pairs(facts), tokenizer, seq_len,
                                 template=lambda question: D.QA_PROMPT.format(question=question))


def qa_accuracy(model, tokenizer, facts: Sequence[D.Fact]) -> float:
    """Share of (fact, phrasing) questions whose true value the model ranks first among the attribute's values."""
    from ..evaluate import continuation_logprobs

    prompts, continuations, owner = [], [], []
    for k, f in enumerate(facts):
        for q in D.QUESTIONS[f.attribute]:
            for v in D.ATTRIBUTES[f.attribute]:
                prompts.append(D.QA_PROMPT.format(question=q.format(e=f.entity)))
                continuations.append(" " + v)
                owner.append((k, q, v))
    if not prompts:
        return float("nan")
    scores = continuation_logprobs(model, tokenizer, prompts, continuations)
    best: dict[tuple, tuple[float, str]] = {}
    for (k, q, v), s in zip(owner, scores):
        if (k, q) not in best or s > best[(k, q)][0]:
            best[(k, q)] = (s, v)
    return float(np.mean([best[(k, q)][1] == facts[k].value for (k, q) in best]))


def task_documents(world: D.World, task: KnowledgeTask, n_docs: int, *, seed: int) -> list[str]:
    """The task's unlabelled text (TAPT, Gururangan et al.: the task's own training inputs, unlabelled): B-style fact
    sentences about the facts the task fine-tunes on — never its held-out facts, whose answers the test asks for
    (biographies are left out: they state every fact of a person)."""
    rng = random.Random(f"tapt-{seed}")
    return [" ".join(world.fact_sentences(rng, rng.randint(2, 5), task.train)) for _ in range(n_docs)]


def finetune_and_score(model, tokenizer, task: KnowledgeTask, *, steps: int, lr: float, batch_size: int,
                       seq_len: int, seed: int, device: str = "cpu", precision: str = "fp32", progress: bool = False,
                       desc: str = "fine-tune") -> dict:
    """Fine-tune a *copy* of ``model`` on the task's labelled questions (on ``device``, in ``precision``: where the
    chapter trains); accuracy on train / test / unstated."""
    from ..finetune import finetune

    tuned = finetune(model, encode_qa(task.train, tokenizer, seq_len), steps=steps, lr=lr, seed=seed,
                     batch_size=batch_size, device=device, precision=precision, progress=progress, desc=desc)
    return {"train": qa_accuracy(tuned, tokenizer, task.train), "test": qa_accuracy(tuned, tokenizer, task.test),
            "unstated": qa_accuracy(tuned, tokenizer, task.unstated) if task.unstated else float("nan")}
