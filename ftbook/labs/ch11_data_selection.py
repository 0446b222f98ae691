"""The data-selection lab of chapter 11: which data to pre-train, continue and fine-tune on, measured in a world whose
pre-training mixture is known exactly. The selection and mixture *methods* live in
:mod:`ftbook.methods.data_selection`; this module builds the chapter's corpora, models and arms around them.

* **Curation before pre-training** (Longpre et al. 2023). A raw corpus is the world's documents with a known share
  replaced by shuffled-word copies (:func:`plant_corrupted`). :func:`quality_filter` keeps the documents whose
  word n-grams look more like a small clean reference than like the raw corpus (GPT-3's classifier, as n-gram
  importance weights); :func:`drop_domain` removes every sentence about one attribute (a domain left out).
  :func:`pretrain` trains a small model from scratch on a corpus; :func:`curation_job` fine-tunes it on the fact
  task and scores it before and after.
* **Selecting pre-fine-tuning data** (Kang et al. 2024, GOT-D). From a candidate pool, a budget of documents is
  chosen at random, by n-gram target matching (DSIR), by target matching in the base model's embeddings, and by
  distribution shifting (OT between what the base read and the target, :func:`select_all`); each selection is
  trained on for the same steps and then the same fine-tune runs (:func:`prefinetune_job`).
* **Skill mixtures** (Chen et al. 2023, Skill-it). The world's procedural tasks asked as ``q : ... a :`` are the
  skills; :func:`single_skill_losses` gives the rows of the skill graph, :func:`mixture_job` trains a model
  round by round on a uniform or a Skill-it mixture at equal tokens.

The fact task every fine-tune uses: questions ``q : where does kalo live ? a :`` about the world's people, in the form
pre-training wrote questions; a fine-tune trains on the stated facts of half the people and is scored on the other half,
and the other way round (:func:`crossfit_scores`): what it answers about people it was not tuned on comes from what
the model read before.
"""
from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from .. import data as D
from .. import models
from ..finetune import encode_pairs, finetune
from ..hub import load_rows
from ..methods import data_selection as S
from ..modeling import from_config, tiny_config
from ..train import TrainConfig, evaluate_loss, train

QA_PHRASINGS = (0, 1)     # both question forms of every fact are trained and scored


def check_finetune_seq_len(cfg, tokenizer, world: D.World) -> None:
    """The one knob check that needs the tokenizer and the world (the others are the spec's, rules between knobs
    included): ``finetune_seq_len`` holds the longest fact question or skill prompt with its answer. One clear error
    naming the parameter, before any training."""
    from ..config import ConfigError

    prompts, answers = fact_prompts(world.facts)
    for skill in cfg.skills:
        p, a = skill_examples(skill, 50, seed=0)
        prompts, answers = prompts + p, answers + a
    longest = max(len(tokenizer(f"{p} {a}", add_special_tokens=False)["input_ids"]) for p, a in zip(prompts, answers))
    if cfg.finetune_seq_len < longest:
        raise ConfigError("finetune_seq_len", f"the longest question with its answer takes {longest} tokens, "
                                              f"got {cfg.finetune_seq_len}")


def hub_texts(spec: str, n: int, *, seed: int) -> list[str]:
    """``n`` non-empty paragraphs of a hub text set ``hf:org/name[@config]`` (``text`` column), drawn with ``seed``:
    off-target candidates for the pool at the ``gpu`` profile. Empty ``spec``: none."""
    if not spec:
        return []
    rows = load_rows(spec, "train")   # the hub's, or its local stand-in (ftbook.standins) on the gpu code path
    texts = [t.strip() for t in rows["text"] if len(t.split()) >= 8]
    rng = random.Random(f"hub-{seed}")
    return rng.sample(texts, min(n, len(texts)))


# --- the corpus, its planted noise, and two curation choices -----------------------------------------------------
def shuffle_words(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    rng.shuffle(words)
    return " ".join(words)


def plant_corrupted(docs: Sequence[str], rate: float, *, seed: int) -> tuple[list[str], np.ndarray]:
    """Replace a share ``rate`` of the documents (each with probability ``rate``) by a shuffled-word copy: the same
    words, no grammar — low-quality text at a known rate. Returns (documents, which are corrupted)."""
    if not 0 <= rate < 1:
        raise ValueError(f"rate must lie in [0, 1), got {rate}")
    rng = random.Random(f"corrupt-{seed}")
    corrupted = np.array([rng.random() < rate for _ in docs], dtype=bool)
    return [shuffle_words(d, rng) if c else d for d, c in zip(docs, corrupted)], corrupted


def quality_filter(docs: Sequence[str], reference: Sequence[str], *, keep: float, n: int = 2,
                   buckets: int = 1 << 12) -> tuple[np.ndarray, np.ndarray]:
    """Keep the share ``keep`` of the documents whose n-grams look most like a clean ``reference`` sample and least
    like the raw corpus itself (mean log importance weight per n-gram; GPT-3's quality classifier in its simplest
    form). Returns (keep mask, scores). With ``n=1`` the filter sees no word order: a shuffled document has the
    same words as its source and scores alike."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must lie in (0, 1], got {keep}")
    scores = S.importance_weights(docs, reference, docs, n=n, buckets=buckets, per_ngram=True)
    mask = np.zeros(len(docs), dtype=bool)
    mask[np.argsort(-scores, kind="stable")[:round(keep * len(docs))]] = True
    return mask, scores


def filter_report(keep: np.ndarray, corrupted: np.ndarray) -> dict[str, float]:
    """How a filter did against the planted truth: the clean share of what it kept, the share of corrupted
    documents it removed, the share of clean ones it removed, and the share kept."""
    keep, corrupted = np.asarray(keep, bool), np.asarray(corrupted, bool)
    return {"clean share kept": float((~corrupted[keep]).mean()) if keep.any() else float("nan"),
            "corrupted removed": float((~keep[corrupted]).mean()) if corrupted.any() else float("nan"),
            "clean removed": float((~keep[~corrupted]).mean()) if (~corrupted).any() else float("nan"),
            "kept": float(keep.mean())}


def domain_words(attribute: str) -> set[str]:
    """The words only a sentence about ``attribute`` uses: its values, in both surface languages."""
    if attribute not in D.ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; known: {', '.join(D.ATTRIBUTES)}")
    values = D.ATTRIBUTES[attribute]
    return set(values) | {D.to_second_language(v) for v in values}


def sentences(doc: str) -> list[str]:
    """A document's sentences (each ends with `` .``, as the world writes them)."""
    return [s for s in re.split(r"(?<= \.) ", doc) if s]


def states_domain(doc: str, attribute: str) -> bool:
    return bool(domain_words(attribute) & set(doc.split()))


def drop_domain(docs: Sequence[str], attribute: str) -> list[str]:
    """Every document without its sentences about ``attribute`` (documents left empty are dropped)."""
    words = domain_words(attribute)
    out = []
    for doc in docs:
        kept = " ".join(s for s in sentences(doc) if not words & set(s.split()))
        if kept:
            out.append(kept)
    return out


# --- pre-training a small model from scratch -----------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """A training run's settings (pre-training, pre-fine-tuning, fine-tuning). ``init``: ``"scratch"`` (a new
    ``n_layer`` x ``d_model`` Llama) or a model spec (``hf:...``, ``path:...``) to start from."""

    steps: int
    lr: float
    batch_size: int = 16
    seq_len: int = 64
    warmup_steps: int = 10
    n_layer: int = 1
    d_model: int = 64
    init: str = "scratch"
    device: str = "cpu"
    precision: str = "fp32"


def tokenizer_for(init: str, profile: str):
    """The tokenizer every model of the chapter shares: the zoo's (trained on seed 0's world) or the hub model's."""
    if init == "scratch":
        from .. import zoo

        return zoo.tokenizer_for(zoo.recipe("tiny", profile), 0)
    return models.load(init)[1]


def new_model(tokenizer, recipe: Recipe, *, seed: int):
    if recipe.init == "scratch":
        config = tiny_config("llama", vocab_size=len(tokenizer), n_layer=recipe.n_layer, d_model=recipe.d_model,
                             max_len=max(256, recipe.seq_len))
        return from_config(config, seed=seed)
    return models.load(recipe.init)[0]


def snapshot(model) -> dict[str, torch.Tensor]:
    """The weights of ``model`` as CPU tensors: what travels between worker processes (a model that has run a
    forward pass carries hooks that do not pickle)."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def model_from(weights: Mapping[str, torch.Tensor], tokenizer, recipe: Recipe):
    """A model of ``recipe``'s architecture holding ``weights`` (from :func:`snapshot`)."""
    model = new_model(tokenizer, recipe, seed=0)
    model.load_state_dict(weights)
    return model


def _config(recipe: Recipe, *, seed: int, desc: str, schedule: str = "cosine", warmup: int | None = None):
    return TrainConfig(steps=recipe.steps, lr=recipe.lr, batch_size=recipe.batch_size,
                       warmup_steps=min(recipe.warmup_steps if warmup is None else warmup, recipe.steps),
                       schedule=schedule, seed=seed, device=recipe.device, precision=recipe.precision, desc=desc)


def pretrain(docs: Sequence[str], tokenizer, recipe: Recipe, *, seed: int, model=None):
    """Train ``model`` (default: a new one from ``recipe``, initialised from ``seed``) on ``docs`` packed into blocks
    of ``seq_len`` tokens; ``seed`` also orders the batches. Returns the model."""
    model = new_model(tokenizer, recipe, seed=seed) if model is None else model
    blocks = D.pack(docs, tokenizer, recipe.seq_len)
    train(model, blocks, _config(recipe, seed=seed, desc=f"pre-train ({len(docs)} documents)"))
    return model


# --- the fact task ---------------------------------------------------------------------------------------------
def fact_split(world: D.World) -> tuple[list[D.Fact], list[D.Fact]]:
    """The stated facts of the first and of the second half of the people: a fine-tune trains on one half and is
    scored on the other (and the other way round, :func:`crossfit_scores`)."""
    half = set(world.entities[:len(world.entities) // 2])
    seen = world.seen_facts()
    return [f for f in seen if f.entity in half], [f for f in seen if f.entity not in half]


def fact_prompts(facts: Sequence[D.Fact]) -> tuple[list[str], list[str]]:
    """Every fact asked in both question forms, as pre-training wrote questions (``q : where does kalo live ? a :``;
    answers ``paris .``)."""
    prompts, answers = [], []
    for phrasing in QA_PHRASINGS:
        p, a = D.qa_pairs(facts, phrasing=phrasing)
        prompts += p
        answers += a
    return prompts, answers


def fact_scores(model, tokenizer, facts: Sequence[D.Fact]) -> dict[str, float]:
    """Accuracy per attribute (the true value ranked first among the attribute's values, mean over both phrasings;
    chance = 1 / number of values) and ``mean`` over all facts."""
    return summarize(facts, fact_correct(model, tokenizer, facts))


def fact_correct(model, tokenizer, facts: Sequence[D.Fact]) -> np.ndarray:
    """Per fact, the share of its two phrasings answered right (0, 0.5 or 1)."""
    from ..evaluate import rank_candidates

    prompts, _ = fact_prompts(facts)
    values = [D.ATTRIBUTES[f.attribute] for f in facts] * len(QA_PHRASINGS)
    chosen = rank_candidates(model, tokenizer, prompts, [[" " + v for v in vs] for vs in values])
    truth = [f.value for f in facts] * len(QA_PHRASINGS)
    return np.array([vs[k] == t for vs, k, t in zip(values, chosen, truth)]).reshape(len(QA_PHRASINGS), -1).mean(0)


def summarize(facts: Sequence[D.Fact], correct: np.ndarray) -> dict[str, float]:
    out = {a: float(correct[[f.attribute == a for f in facts]].mean()) for a in D.ATTRIBUTES
           if any(f.attribute == a for f in facts)}
    out["mean"] = float(np.mean(correct))
    return out


def finetune_facts(model, tokenizer, facts: Sequence[D.Fact], recipe: Recipe, *, seed: int):
    """A copy of ``model`` fine-tuned on the question-answer pairs of ``facts`` (loss on the answers only)."""
    prompts, answers = fact_prompts(facts)
    data = encode_pairs(prompts, answers, tokenizer, recipe.seq_len)
    return finetune(model, data, steps=recipe.steps, lr=recipe.lr, seed=seed, batch_size=recipe.batch_size,
                    warmup_steps=recipe.warmup_steps, device=recipe.device, precision=recipe.precision,
                    desc="fine-tune on facts")


def crossfit_scores(model, tokenizer, halves: tuple[Sequence[D.Fact], Sequence[D.Fact]], recipe: Recipe, *,
                    seed: int) -> dict[str, float]:
    """Fine-tune on one half of the people, score the other half, and the other way round: every stated fact is
    scored once by a model that was never tuned on it. Returns :func:`summarize` over all of them."""
    first, second = halves
    tuned_on_first = finetune_facts(model, tokenizer, first, recipe, seed=seed)
    tuned_on_second = finetune_facts(model, tokenizer, second, recipe, seed=seed + 1)
    facts = list(second) + list(first)
    correct = np.concatenate([fact_correct(tuned_on_first, tokenizer, second),
                              fact_correct(tuned_on_second, tokenizer, first)])
    return summarize(facts, correct)


def curation_job(model, tokenizer, halves, recipe: Recipe, *, seed: int) -> dict:
    """Score a pre-trained model on the facts before the fine-tune and after it (:func:`crossfit_scores`)."""
    facts = list(halves[0]) + list(halves[1])
    return {"before": fact_scores(model, tokenizer, facts),
            "after": crossfit_scores(model, tokenizer, halves, recipe, seed=seed)}


def pretrain_and_score(docs, tokenizer, pretraining: Recipe, finetuning: Recipe, halves, *, seed: int,
                       finetune_seed: int) -> tuple[dict, dict]:
    """A worker's whole job for one corpus: pre-train, then :func:`curation_job`. Returns (weights, scores)."""
    model = pretrain(docs, tokenizer, pretraining, seed=seed)
    return snapshot(model), curation_job(model, tokenizer, halves, finetuning, seed=finetune_seed)


# --- selecting pre-fine-tuning data ------------------------------------------------------------------------------
@torch.no_grad()
def mean_states(model, tokenizer, texts: Sequence[str], *, max_tokens: int = 64, batch_size: int = 64) -> torch.Tensor:
    """Each text's embedding in ``model``: the last hidden state averaged over its (first ``max_tokens``) tokens,
    scaled to unit length."""
    from ..evaluate import pad_right

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = [ids[:max_tokens] or [tokenizer.eos_token_id]
            for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    out = []
    try:
        for start in range(0, len(rows), batch_size):
            ids, mask = pad_right(rows[start:start + batch_size], tokenizer.pad_token_id)
            hidden = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                           output_hidden_states=True).hidden_states[-1].float().cpu()
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            out.append(torch.nn.functional.normalize(pooled, dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out)


ARMS = ("random", "target-matching (n-grams)", "target-matching (embeddings)", "distribution-shifting")


def embedding_scores(pool_x, target_x, reference_x, *, eps: float) -> dict[str, np.ndarray]:
    """Both embedding selectors' scores for every candidate (lower = chosen first), in one whitened space
    (:func:`ftbook.methods.data_selection.whitening`, fitted on the three samples): ``match`` ignores the reference,
    ``shift`` is the OT potential against it."""
    white = S.whitening(pool_x, target_x, reference_x)
    pool_w, target_w, reference_w = white(pool_x), white(target_x), white(reference_x)
    return {"match": S.match_scores(pool_w, target_w, eps=eps),
            "shift": S.shift_scores(pool_w, target_w, reference_w, eps=eps),
            "points": (pool_w, target_w, reference_w)}


def select_all(pool: Sequence[str], target: Sequence[str], reference: Sequence[str], embed, budget: int, *,
               seed: int, eps: float, rounds: int = 1) -> dict[str, np.ndarray]:
    """The four selections of ``budget`` documents from ``pool``, by arm (:data:`ARMS`). ``target`` is the target
    task's text (its prompts, without answers), ``reference`` a sample of what the base model was pre-trained on,
    ``embed(texts)`` the base model's embeddings (:func:`embedding_scores`)."""
    scores = embedding_scores(embed(pool), embed(target), embed(reference), eps=eps)
    pool_w, target_w, reference_w = scores["points"]
    rng = np.random.default_rng([seed, 11])
    return {
        "random": np.sort(rng.choice(len(pool), budget, replace=False)),
        "target-matching (n-grams)": S.gumbel_top_k(S.importance_weights(pool, target), budget, seed=seed),
        "target-matching (embeddings)": np.argsort(scores["match"], kind="stable")[:budget],
        "distribution-shifting": (np.argsort(scores["shift"], kind="stable")[:budget] if rounds == 1 else
                                  S.select_distribution_shift(pool_w, target_w, reference_w, budget, eps=eps,
                                                              rounds=rounds)),
    }


def preference(scores, chosen_kind) -> float:
    """How strongly ``scores`` (lower = chosen first) prefer the documents of one kind: the probability that a
    document of the kind scores below one that is not (an AUC; 0.5 = no preference)."""
    scores, kind = np.asarray(scores, dtype=np.float64), np.asarray(chosen_kind, dtype=bool)
    if kind.all() or not kind.any():
        return float("nan")
    ranks = scores.argsort(kind="stable").argsort(kind="stable") + 1.0   # ties are rare for real-valued scores
    below = ranks[~kind].sum() - (~kind).sum() * ((~kind).sum() + 1) / 2  # Mann-Whitney U of the other documents
    return float(below / (kind.sum() * (~kind).sum()))


def selection_report(pool: Sequence[str], chosen: Sequence[int], world: D.World, attribute: str) -> dict[str, float]:
    """What a selection holds, by the world's ground truth: documents stating the left-out ``attribute``, in the
    ``q : ... a :`` form, in the second language, and the share of that attribute's stated facts it states."""
    docs = [pool[i] for i in chosen]
    stated = {(f.entity, f.value) for f in world.seen_facts() if f.attribute == attribute}
    found = set()
    for doc in docs:
        first = D.to_second_language(doc) if second_language(doc) else doc  # the cipher is its own inverse
        for sentence in sentences(first):
            words = set(sentence.split())
            found |= {(e, v) for e, v in stated if e in words and v in words}
    return {f"states {attribute}": float(np.mean([states_domain(d, attribute) for d in docs])),
            "q/a form": float(np.mean([d.startswith(("q :", "d :")) for d in docs])),
            "second language": float(np.mean([second_language(d) for d in docs])),
            f"{attribute} facts stated": len(found) / max(1, len(stated))}


def _first_language_words() -> set[str]:
    texts = [t for ts in D.FACT_TEMPLATES.values() for t in ts] + [q for qs in D.QUESTIONS.values() for q in qs]
    texts += [t for task in D.TASKS.values() for t in task.instructions + task.narratives]
    texts += [v for vs in D.ATTRIBUTES.values() for v in vs] + ["q a"]
    words = {w for t in texts for w in re.sub(r"\{[^}]*\}", " ", t).split()}
    second = {D.to_second_language(w) for w in words}
    return words - second  # words that read the same in both languages (digits, punctuation) tell nothing


_FIRST_WORDS = _first_language_words()
_SECOND_WORDS = {D.to_second_language(w) for w in _FIRST_WORDS}


def second_language(doc: str) -> bool:
    """True for a document in the world's second surface language (more of its words are ciphered template words
    than plain ones)."""
    words = doc.split()
    return sum(w in _SECOND_WORDS for w in words) > sum(w in _FIRST_WORDS for w in words)


def prefinetune_job(base: Mapping[str, torch.Tensor], tokenizer, docs: Sequence[str], pretraining: Recipe,
                    finetuning: Recipe, halves, *, seed: int) -> dict:
    """Continue pre-training the ``base`` weights on the selected ``docs`` for ``pretraining.steps``, then the fact
    fine-tune (:func:`curation_job`: scores before and after it)."""
    model = pretrain(docs, tokenizer, pretraining, seed=seed, model=model_from(base, tokenizer, pretraining))
    return curation_job(model, tokenizer, halves, finetuning, seed=seed)


# --- skills and mixtures -----------------------------------------------------------------------------------------
# Skills: the world's procedural tasks as pre-training wrote them (narrative prose, cut before the answer), either a
# whole task ("max", its lists of 3-5 digits) or a task at one list length ("max:6").
LIST_TASKS: dict[str, object] = {"max": max, "min": min, "first": lambda xs: xs[0], "last": lambda xs: xs[-1],
                                 "length": len}
OTHER_TASKS = ("count", "parity")


def parse_skill(skill: str) -> tuple[str, int | None]:
    """``"max:4"`` → ``("max", 4)``; ``"count"`` → ``("count", None)`` (the task's own lists)."""
    task, _, length = skill.partition(":")
    ok = (task in LIST_TASKS and (not length or (length.isdigit() and 1 <= int(length) <= 12))) or \
        (task in OTHER_TASKS and not length)
    if not ok:
        raise ValueError(f"a skill is a task ({', '.join((*LIST_TASKS, *OTHER_TASKS))}) or 'task:length' for "
                         f"{', '.join(LIST_TASKS)} with length 1-12, got {skill!r}")
    return task, int(length) if length else None


def skill_candidates(skill: str) -> list[str]:
    return ["even", "odd"] if parse_skill(skill)[0] == "parity" else [str(d) for d in range(10)]


def skill_examples(skill: str, n: int, *, seed: int) -> tuple[list[str], list[str]]:
    """``n`` (prompt, answer) pairs of a skill, in the task's narrative templates that state every argument before
    the answer, cut before it (``of the numbers 3 1 4 the largest is`` → ``4``)."""
    task, length = parse_skill(skill)
    family = D.TASKS[task]
    templates = [t for t in family.narratives if "{" not in t[t.index("{answer}") + len("{answer}"):]]
    rng = random.Random(f"skill-{skill}-{seed}")
    prompts, answers = [], []
    for _ in range(n):
        if length is None:
            args = family.sample(rng)
        else:
            xs = [rng.randrange(10) for _ in range(length)]
            args = {"xs": " ".join(map(str, xs)), "answer": LIST_TASKS[task](xs)}
        template = rng.choice(templates)
        prompts.append(template[:template.index("{answer}")].format(**args).strip())
        answers.append(str(args["answer"]))
    return prompts, answers


@dataclass
class SkillSets:
    """Per skill: encoded training rows (a large pool the mixtures draw from), validation rows (the losses Skill-it
    reads), and test prompts/answers (accuracy)."""

    skills: tuple[str, ...]
    train: dict[str, dict[str, np.ndarray]]
    val: dict[str, dict[str, np.ndarray]]
    test: dict[str, tuple[list[str], list[str]]]


def skill_sets(skills: Sequence[str], tokenizer, *, n_train: int, n_val: int, n_test: int, seq_len: int,
               seed: int) -> SkillSets:
    def encoded(prompts, answers):
        rows = encode_pairs(prompts, answers, tokenizer, seq_len)
        return {"input_ids": np.asarray(rows["input_ids"]), "labels": np.asarray(rows["labels"])}

    train_, val, test = {}, {}, {}
    for k, skill in enumerate(skills):
        train_[skill] = encoded(*skill_examples(skill, n_train, seed=seed * 100 + 3 * k))
        val[skill] = encoded(*skill_examples(skill, n_val, seed=seed * 100 + 3 * k + 1))
        test[skill] = skill_examples(skill, n_test, seed=seed * 100 + 3 * k + 2)
    return SkillSets(tuple(skills), train_, val, test)


def skill_losses(model, sets: SkillSets) -> np.ndarray:
    """Validation loss (answer tokens) of every skill."""
    return np.array([evaluate_loss(model, sets.val[s], batch_size=128) for s in sets.skills])


def skill_accuracy(model, tokenizer, sets: SkillSets) -> dict[str, float]:
    """Test accuracy of every skill: the right answer ranked first among the skill's answers."""
    from ..evaluate import rank_candidates

    out = {}
    for skill in sets.skills:
        prompts, answers = sets.test[skill]
        candidates = skill_candidates(skill)
        chosen = rank_candidates(model, tokenizer, prompts, [[" " + c for c in candidates]] * len(prompts))
        out[skill] = float(np.mean([candidates[i] == a for i, a in zip(chosen, answers)]))
    return out


def _rows(sets: SkillSets, counts: Sequence[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """``counts[k]`` training rows of skill ``k`` (drawn with replacement), all skills together."""
    parts = {"input_ids": [], "labels": []}
    for skill, count in zip(sets.skills, counts):
        pick = rng.integers(0, len(sets.train[skill]["input_ids"]), size=int(count))
        for column, chunks in parts.items():
            chunks.append(sets.train[skill][column][pick])
    return {column: np.concatenate(chunks) for column, chunks in parts.items()}


def single_skill_losses(base: Mapping[str, torch.Tensor], tokenizer, sets: SkillSets, skill: str, recipe: Recipe, *,
                        seed: int) -> np.ndarray:
    """Every skill's validation loss after ``recipe.steps`` steps on ``skill`` alone, starting from the ``base``
    weights: one row of the skill graph."""
    model = model_from(base, tokenizer, recipe)
    counts = [recipe.steps * recipe.batch_size if s == skill else 0 for s in sets.skills]
    data = _rows(sets, counts, np.random.default_rng([seed, sets.skills.index(skill)]))
    train(model, data, _config(recipe, seed=seed, desc=f"graph: {skill}", schedule="constant"))
    return skill_losses(model, sets)


def mixture_job(base: Mapping[str, torch.Tensor], tokenizer, sets: SkillSets, recipe: Recipe, *, rounds: int,
                graph=None, eta: float = 1.0, window: int = 3, seed: int) -> dict:
    """Train the ``base`` weights for ``rounds`` x ``recipe.steps`` steps on a mixture of the skills: uniform when
    ``graph`` is None, else Skill-it's online weights from ``graph`` and the validation losses seen so far. Each
    round draws exactly ``steps x batch_size`` rows by the round's weights (equal tokens for every policy), so a
    round is one pass over its rows; the learning rate is constant after the first round's warm-up.
    Returns the per-round history (before each round and at the end: validation losses, test accuracies, and the
    round's weights) and the final test accuracy."""
    model = model_from(base, tokenizer, recipe).to(recipe.device)
    history, observed = [], []
    for r in range(rounds + 1):
        losses = skill_losses(model, sets)
        row = {"round": r, "examples": r * recipe.steps * recipe.batch_size,
               **{f"loss/{s}": float(v) for s, v in zip(sets.skills, losses)},
               **{f"accuracy/{s}": v for s, v in skill_accuracy(model, tokenizer, sets).items()}}
        history.append(row)
        if r == rounds:
            break
        observed.append(losses)
        weights = (np.full(len(sets.skills), 1 / len(sets.skills)) if graph is None
                   else S.skill_it_weights(graph, observed, eta=eta, window=window))
        row.update({f"weight/{s}": float(w) for s, w in zip(sets.skills, weights)})
        counts = S.mixture_counts(weights, recipe.steps * recipe.batch_size)
        data = _rows(sets, counts, np.random.default_rng([seed, r]))
        train(model, data, _config(recipe, seed=seed * 1000 + r, desc=f"mixture round {r + 1}/{rounds}",
                                   schedule="constant", warmup=recipe.warmup_steps if r == 0 else 0))
    return {"history": history, "accuracy": {s: history[-1][f"accuracy/{s}"] for s in sets.skills}}


def learning_curve(history: Sequence[Mapping], skills: Sequence[str]) -> np.ndarray:
    """The skills' mean test accuracy after each round (round 0 = the start)."""
    return np.array([np.mean([h[f"accuracy/{s}"] for s in skills]) for h in history])


def mean_accuracy(scores: Mapping[str, float]) -> float:
    return float(np.mean([v for k, v in scores.items() if k != "mean"]))


def with_(recipe: Recipe, **changes) -> Recipe:
    """``recipe`` with some fields changed (the chapter's stages share most settings)."""
    return replace(recipe, **changes)
