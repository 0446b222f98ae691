"""Hub datasets, the ``gpu`` profile's data: one reader, and the column layouts the chapters use.

A dataset spec is ``hf:org/name`` or ``hf:org/name@config``. :func:`load_rows` is the one place the book calls
``datasets.load_dataset``: it refuses at once when the run is offline (``HF_HUB_OFFLINE``), naming the dataset —
unless stand-ins are on (:mod:`ftbook.standins`): then it reads the dataset's local stand-in, same columns and splits.
The readers below turn a dataset's columns into what a chapter trains on.
"""
from __future__ import annotations

from .modeling import ModelSpecError, offline


def parse_dataset_spec(spec: str) -> tuple[str, str | None]:
    """``hf:org/name@config`` -> (``org/name``, ``config`` or None)."""
    if not isinstance(spec, str) or not spec.startswith("hf:") or not spec[3:].partition("@")[0]:
        raise ValueError(f"a hub dataset spec looks like 'hf:org/name' or 'hf:org/name@config', got {spec!r}")
    name, _, config = spec[3:].partition("@")
    return name, config or None


def load_rows(spec: str, split: str):
    """The ``split`` of a hub dataset (``split`` may slice: ``"train[0:100]"``)."""
    import datasets

    from . import standins

    name, config = parse_dataset_spec(spec)
    if standins.active():
        return standins.load_rows(name, config, split)
    if offline():
        raise ModelSpecError(f"{spec!r} needs the Hugging Face hub, but this run is offline "
                             f"(HF_HUB_OFFLINE/FTBOOK_OFFLINE is set)")
    return datasets.load_dataset(name, config, split=split)


def texts(spec: str, split: str, *, max_docs: int | None = None, min_chars: int = 40) -> list[str]:
    """Documents of a text dataset (its ``text`` column; wikitext): stripped, at least ``min_chars`` long."""
    out = []
    for text in load_rows(spec, split)["text"]:
        if len(text.strip()) >= min_chars:
            out.append(text.strip())
            if max_docs is not None and len(out) >= max_docs:
                break
    return out


def query_response_pairs(spec: str, n: int, *, split: str = "train", offset: int = 0) -> tuple[list[str], list[str]]:
    """(prompts, answers) of a dataset with ``query``/``response`` columns (MetaMathQA), prompted
    ``Question: …\\nAnswer:``."""
    rows = load_rows(spec, f"{split}[{offset}:{offset + n}]")
    return [f"Question: {q}\nAnswer:" for q in rows["query"]], list(rows["response"])


def instruction_pairs(spec: str, n: int, *, split: str = "train", offset: int = 0) -> list[tuple[str, str]]:
    """(instruction, response) pairs of an instruction set: ``hf:databricks/databricks-dolly-15k`` (instruction,
    context, response), ``hf:tatsu-lab/alpaca`` (instruction, input, output) and ``hf:GAIR/lima``
    (conversations: the first user turn and its answer)."""
    out = []
    for row in load_rows(spec, f"{split}[{offset}:{offset + n}]"):
        if "conversations" in row:
            turns = row["conversations"]
            if len(turns) >= 2:
                out.append((turns[0], turns[1]))
            continue
        instruction = row.get("instruction", "")
        extra = row.get("context") or row.get("input") or ""
        answer = row.get("response") or row.get("output") or ""
        out.append((f"{instruction}\n\n{extra}".strip(), answer.strip()))
    return out


def labelled_texts(spec: str, split: str, n: int, *, seed: int, separator: str = " </s></s> "):
    """``n`` shuffled (text, label) rows of a GLUE-style task (``hf:nyu-mll/glue@sst2`` / ``@mrpc``): a
    ``sentence`` column, or ``sentence1``/``sentence2`` joined by ``separator``. GLUE's test labels are hidden, so
    ``split="test"`` reads the validation split."""
    rows = load_rows(spec, "validation" if split == "test" else split)
    rows = rows.shuffle(seed=seed).select(range(min(n, len(rows))))
    if "sentence" in rows.column_names:
        texts_ = list(rows["sentence"])
    else:
        texts_ = [a + separator + b for a, b in zip(rows["sentence1"], rows["sentence2"])]
    return texts_, [int(y) for y in rows["label"]]
