import json

import pytest

from ftbook import claims, records, report, specs


def _cfg(profile="cpu", strict=True):
    return specs.make("01_pretraining", profile=profile, strict=strict)


def test_claim_verdicts_and_strict_failure_write_the_record_first(tmp_home):
    book = claims.ClaimBook(_cfg())
    assert book.check("a", paper="P", claim="x > 1", measured=2.0, op=">", threshold=1).holds is True
    assert book.check("b", paper="P", claim="y <= 0", measured=0.5, op="<=", threshold=0).holds is False
    assert book.check("c", paper="P", claim="big only", measured=0, op=">", threshold=1, scale="gpu").holds is None
    table = book.table()
    assert list(table.verdict) == ["holds", "does not hold in this run", "checked at gpu scale only"]
    assert list(table["reference runs"]) == ["—", "—", "—"]   # no reference runs for these made-up claims
    with pytest.raises(claims.ClaimFailed, match=r"\[b\]"):
        book.finish({"m": 1})
    recs = records.load_records()
    assert len(recs) == 1 and [c["holds"] for c in recs[0]["claims"]] == [True, False, None]
    assert recs[0]["metrics"] == {"m": 1} and recs[0]["git_sha"] is not None


def test_smoke_runs_judge_nothing_and_non_strict_runs_do_not_raise(tmp_home):
    assert specs.make("01", profile="cpu").strict is False   # a reader's run never fails on a claim
    book = claims.ClaimBook(_cfg("smoke"))
    assert book.check("a", paper="P", claim="c", measured=0, op=">", threshold=1).holds is None
    book.finish()
    lenient = claims.ClaimBook(_cfg("cpu", strict=False))
    lenient.check("a", paper="P", claim="c", measured=0, op=">", threshold=1)
    lenient.finish()  # records the failure, does not raise
    assert [r["claims"][0]["holds"] for r in records.load_records()] == [None, False]


def _reference(tmp_path, monkeypatch, held_b: int):
    """Reference results of chapter 01 in which claim 'b' held at ``held_b`` of 10 seeds and 'a' at all."""
    from ftbook import reference

    runs = [{"seed": s, "claims": [
        {"id": "a", "paper": "P", "claim": "x > 1", "measured": 2.0, "op": ">", "threshold": 1, "scale": "cpu",
         "holds": True},
        {"id": "b", "paper": "P", "claim": "y <= 0", "measured": -1.0 if s < held_b else 0.5, "op": "<=",
         "threshold": 0, "scale": "cpu", "holds": s < held_b}], "wall_time_s": 10.0, "peak_rss_mb": 100.0}
        for s in range(10)]
    monkeypatch.setenv("FTBOOK_RESULTS", str(tmp_path / "results"))
    results = reference.summarize(runs, chapter="01_pretraining", profile="cpu", code={"source": "x"})
    reference.results_path("01_pretraining").parent.mkdir(parents=True)
    reference.results_path("01_pretraining").write_text(reference.dumps(results))
    return results


def test_a_claim_that_fails_in_a_readers_run_is_a_verdict_with_its_reference_rate(tmp_home, tmp_path, monkeypatch):
    """Claim 'b' held in 9 of 10 reference runs: a run where it does not hold says so and completes, even strict;
    had it held in all 10, the strict run would fail (the chapter tests' rule at seed 0)."""
    _reference(tmp_path, monkeypatch, held_b=9)
    book = claims.ClaimBook(_cfg(strict=True))
    book.check("a", paper="P", claim="x > 1", measured=2.0, op=">", threshold=1)
    book.check("b", paper="P", claim="y <= 0", measured=0.5, op="<=", threshold=0)
    table = book.table()
    assert list(table["reference runs"]) == ["10/10", "9/10"]
    assert table.verdict[1] == "does not hold in this run (held in 9/10 reference runs)"
    book.finish()                                   # no ClaimFailed: the reference says it fails sometimes
    assert book.reference_figure() is not None
    (tmp_path / "results" / "cpu" / "01_pretraining.json").unlink()
    _reference(tmp_path / "again", monkeypatch, held_b=10)
    strict = claims.ClaimBook(_cfg(strict=True))
    strict.check("b", paper="P", claim="y <= 0", measured=0.5, op="<=", threshold=0)
    with pytest.raises(claims.ClaimFailed, match=r"\[b\]"):
        strict.finish()


def test_reference_results_summarize_runs_per_claim(tmp_path, monkeypatch):
    from ftbook import reference

    results = _reference(tmp_path, monkeypatch, held_b=7)
    b = next(c for c in results["claims"] if c["id"] == "b")
    assert (b["held"], b["judged"], b["seeds"]) == (7, 10, list(range(10)))
    assert reference.meets_standard(b) is False and reference.meets_standard(results["claims"][0]) is True
    assert reference.rate_text(b) == "7/10" and not reference.held_in_every_run(b)
    assert json.loads(reference.dumps(results)) == results    # the compact file is the same JSON
    assert reference.rates("01_pretraining")["b"]["values"][-1] == 0.5
    assert reference.totals() == {"chapters": 1, "claims": 2, "meeting": 1, "every_run": 1, "stated_as_rates": 0}
    # a claim stated as a rate ("holds in at least 7 of 10 seeds", decided in advance) meets its own standard
    assert reference.meets_standard({**b, "standard": 0.7}) is True
    text = report.reference_text()
    assert "7/10" in text and "NO" in text
    assert "1 of the 2 claims" in report.reference_summary()


def test_the_chapters_current_declaration_wins_over_the_recorded_one(tmp_path, monkeypatch):
    """A claim restated after the reference runs (as its measured rate, or moved to gpu scale) keeps its values;
    the standard and scale are the ones the chapter's code declares now."""
    from ftbook import reference

    _reference(tmp_path, monkeypatch, held_b=7)
    as_rate = {("01_pretraining", "b"): {"standard": 0.7, "scale": "cpu"}}
    assert reference.totals(declared=as_rate)["meeting"] == 2
    moved = {("01_pretraining", "b"): {"standard": 0.9, "scale": "gpu"}}
    assert reference.totals(declared=moved) == {"chapters": 1, "claims": 1, "meeting": 1, "every_run": 1,
                                                "stated_as_rates": 0}
    table = report.reference_table(declared=moved)
    assert table.set_index("id").loc["b", "held"] == "gpu only (7/10 at cpu)"
    # moved to the scale profile: not judged at cpu either, but judged at scale (and gpu)
    to_scale = {("01_pretraining", "b"): {"standard": 0.9, "scale": "scale"}}
    assert reference.totals(declared=to_scale)["claims"] == 1
    assert report.reference_table(declared=to_scale).set_index("id").loc["b", "held"] == "scale only (7/10 at cpu)"
    b = reference.as_declared(next(c for c in reference.load("01_pretraining")["claims"] if c["id"] == "b"),
                              to_scale[("01_pretraining", "b")])
    assert not reference.judged_at(b, "cpu") and reference.judged_at(b, "scale") and reference.judged_at(b, "gpu")


def test_the_reference_figure_says_where_a_moved_claim_is_judged_now(tmp_home, tmp_path, monkeypatch):
    """Claim 'b' was judged at cpu in the reference runs, then moved to the scale profile: its strip keeps the cpu
    rate and says where it is judged now."""
    _reference(tmp_path, monkeypatch, held_b=2)
    book = claims.ClaimBook(_cfg(strict=False))
    book.check("a", paper="P", claim="x > 1", measured=2.0, op=">", threshold=1)
    book.check("b", paper="P", claim="y <= 0", measured=0.5, op="<=", threshold=0, scale="scale")
    titles = [a.text for a in book.reference_figure().layout.annotations]
    assert titles == ["a · held in 10/10", "b · held in 2/10 at cpu; judged at scale"]


def test_a_claim_stated_as_a_rate_carries_its_standard_into_the_record(tmp_home):
    book = claims.ClaimBook(_cfg(strict=False))
    book.check("r", paper="P", claim="TIES beats TA", measured=0.01, op=">", threshold=0, standard=0.7)
    assert "stated as a rate: ≥ 70%" in book.table()["reference runs"][0]
    book.finish()
    assert records.load_records()[0]["claims"][0]["standard"] == 0.7
    with pytest.raises(ValueError, match="standard"):
        book.check("s", paper="P", claim="c", measured=0, op=">", threshold=0, standard=1.5)


def test_claim_arguments_are_checked():
    book = claims.ClaimBook(_cfg())
    with pytest.raises(ValueError, match="op"):
        book.check("a", paper="P", claim="c", measured=0, op="=>", threshold=1)
    book.check("a", paper="P", claim="c", measured=0, op=">=", threshold=0)
    with pytest.raises(ValueError, match="used twice"):
        book.check("a", paper="P", claim="c", measured=0, op=">=", threshold=0)


def test_record_is_atomic_and_complete(tmp_home):
    path = records.write_record(chapter="x", profile="cpu", seed=0, parameters={"lr": 1e-3},
                                metrics={"loss": float("nan"), "n": 3}, started_at=0.0)
    rec = json.loads(path.read_text())
    for key in ("git_sha", "versions", "hardware", "wall_time_s", "peak_rss_mb", "parameters", "claims"):
        assert key in rec
    assert rec["metrics"] == {"loss": None, "n": 3}  # NaN is written as null, the file stays valid JSON
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_record_counts_the_memory_of_worker_processes(tmp_home, monkeypatch):
    # a chapter's Pool workers train in their own processes: a record that read only its own process's peak
    # memory reported ~550 MB for runs whose workers held more
    from ftbook.parallel import Pool

    def record():
        return json.loads(records.write_record(chapter="x", profile="cpu", seed=0, parameters={},
                                               metrics={}).read_text())

    monkeypatch.setattr(records, "_ENDED_WORKERS_PEAK_MIB", 0.0)   # forget the workers of earlier tests
    assert record()["workers_peak_rss_mb"] is None  # no worker yet (a forked git call is not one)
    with Pool(2) as pool:                            # two workers: real processes (one runs jobs in-process)
        pool.submit(_hold_memory).result()
        assert records.live_workers_peak_rss_mib() >= 800 and record()["workers_peak_rss_mb"] >= 800
    assert record()["workers_peak_rss_mb"] >= 800    # kept after the workers exit


def _hold_memory() -> int:
    block = bytearray(800 * 2 ** 20)   # touched, so resident: the worker's peak passes 800 MiB (torch alone is less)
    block[::4096] = b"x" * len(block[::4096])
    return len(block)


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    class Boom:
        def __str__(self):
            raise RuntimeError("interrupted")

    target = tmp_path / "out.json"
    with pytest.raises(TypeError):
        records.atomic_write_text(target, Boom())
    assert list(tmp_path.iterdir()) == []


def test_broken_record_files_are_skipped_and_latest_wins(tmp_home):
    records.write_record(chapter="x", profile="cpu", seed=0, parameters={}, metrics={"v": 1})
    records.write_record(chapter="x", profile="cpu", seed=0, parameters={}, metrics={"v": 2})
    (records.records_dir() / "broken.json").write_text("{not json")
    assert len(records.load_records()) == 2
    assert [r["metrics"]["v"] for r in records.latest_records()] == [2]


def test_report_lists_every_claim_of_every_run(tmp_home):
    for seed, measured in ((0, 2.0), (1, 0.5)):
        book = claims.ClaimBook(specs.make("01_pretraining", profile="cpu", seed=seed, strict=False))
        book.check("gap", paper="Kaplan", claim="bigger is better", measured=measured, op=">", threshold=1)
        book.finish()
    md = report.markdown()
    assert "cpu / seed 0" in md and "cpu / seed 1" in md
    assert "holds" in md and "does NOT hold" in md
    assert "bigger is better" in report.text()
    assert "| None |" not in md and "| nan |" not in md    # a run without workers shows "—"


def test_stand_in_runs_judge_nothing_and_say_why(tmp_home):
    cfg = specs.make("04", profile="smoke", code_path="gpu", stand_ins=True)
    book = claims.ClaimBook(cfg)
    assert book.check("dare-beats-ta", paper="P", claim="c", measured=1, op=">", threshold=0).holds is None
    assert book.check("a", paper="P", claim="c", measured=1, op=">", threshold=0, scale="gpu").holds is None
    assert set(book.table().verdict) == {"stand-in: not judged"} and book.reference == {}
    full_size = claims.ClaimBook(specs.make("04", profile="gpu", stand_ins=True))
    assert full_size.check("a", paper="P", claim="c", measured=1, op=">", threshold=0).holds is None


def test_the_scale_profile_judges_cpu_and_scale_claims_and_the_specs_moved_gpu_claims(tmp_home):
    def holds(profile, claim_id, scale):
        book = claims.ClaimBook(specs.make("04", profile=profile))
        return book.check(claim_id, paper="P", claim="c", measured=1, op=">", threshold=0, scale=scale)

    assert holds("scale", "a", "cpu").holds is True
    assert holds("scale", "b", "scale").holds is True and holds("cpu", "b", "scale").holds is None
    assert holds("scale", "dare-beats-ta", "gpu").holds is True      # listed in judged_at_scale
    moved = holds("cpu", "dare-beats-ta", "gpu")
    assert moved.holds is None and moved.scale == "scale"
    assert holds("scale", "c", "gpu").holds is None and holds("gpu", "c", "gpu").holds is True
    book = claims.ClaimBook(specs.make("04", profile="cpu"))
    book.check("dare-beats-ta", paper="P", claim="c", measured=1, op=">", threshold=0, scale="gpu")
    book.check("c", paper="P", claim="c", measured=1, op=">", threshold=0, scale="gpu")
    assert list(book.table().verdict) == ["checked at scale (and gpu) only", "checked at gpu scale only"]
    with pytest.raises(ValueError, match="scale must be one of"):
        book.check("d", paper="P", claim="c", measured=1, op=">", threshold=0, scale="big")


def test_records_say_how_much_gpu_memory_a_run_took(tmp_home):
    path = claims.ClaimBook(_cfg("smoke")).finish()
    rec = json.loads(open(path).read())
    assert "gpu_peak_mib" in rec and rec["gpu_peak_mib"] is None   # no GPU in use here
