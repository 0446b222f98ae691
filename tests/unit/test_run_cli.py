import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ftbook import cli, run

FTBOOK = [sys.executable, "-m", "ftbook.cli"]


@pytest.mark.parametrize("command", [[], ["run"], ["book"], ["report"], ["reference"], ["env"], ["data"], ["bench"]])
def test_every_command_has_help(command):
    done = subprocess.run(FTBOOK + command + ["--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: ftbook" in done.stdout


def test_bench_help_lists_the_benchmarks_own_options():
    # `ftbook bench --help` once printed only "rest: arguments for python -m ftbook.bench"
    done = subprocess.run(FTBOOK + ["bench", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--steps" in done.stdout and "--only" in done.stdout


@pytest.mark.parametrize("args, words", [
    (["run", "01", "-p", "n_layr=4"], "did you mean 'n_layer'"),
    (["run", "01", "--profile", "cpux"], "did you mean 'cpu'"),
    (["run", "01", "-p", "lr=-0.1"], "'lr': must be a positive number"),
    (["run", "99"], "unknown chapter"),
    (["run", "01", "-p", "n_layer"], "key=value"),
    (["run", "01", "-p", "seed=1"], "set with --seed 1"),      # not silently run as seed 1 but filed as seed 0
    (["run", "01", "-p", "profile=smoke"], "set with --profile smoke"),   # not silently dropped
    (["run", "01", "--seeds", "0-x"], "'seeds': must look like"),
    (["reference", "04", "--profile", "smoke"], "smoke runs judge no claim"),
    (["reference"], "or pass --all"),
    (["reference", "98"], "unknown chapter"),
])
def test_bad_input_is_one_clear_line_and_no_work(args, words, tmp_home):
    done = subprocess.run(FTBOOK + args, capture_output=True, text=True)
    assert done.returncode == 2
    assert words in done.stderr and "Traceback" not in done.stderr
    assert not tmp_home.exists()  # nothing executed, cached or recorded


def test_values_are_parsed_like_papermill():
    assert cli.parse_parameters(["a=4", "b=1e-3", "c=true", "d=None", "e=tiny,base"]) == \
        {"a": 4, "b": 1e-3, "c": True, "d": None, "e": "tiny,base"}


def test_env_prints_versions_and_caches(tmp_home):
    done = subprocess.run(FTBOOK + ["env"], capture_output=True, text=True)
    info = json.loads(done.stdout)
    assert info["versions"]["torch"].startswith("2.") and info["FTBOOK_HOME"] == str(tmp_home)
    assert "01_pretraining.ipynb" in info["chapters"]


def test_cache_key_follows_notebook_parameters_and_source(tmp_path, monkeypatch):
    notebook = run.notebook_path("01")
    key = run.cache_key(notebook, {"profile": "cpu", "seed": 0})
    assert key == run.cache_key(notebook, {"profile": "cpu", "seed": 0})
    assert key != run.cache_key(notebook, {"profile": "cpu", "seed": 1})
    copy = tmp_path / notebook.name
    nb = json.loads(notebook.read_text())
    nb["cells"][0]["outputs"] = []  # outputs and execution counts do not matter ...
    copy.write_text(json.dumps(nb))
    assert run.cache_key(copy, {"profile": "cpu", "seed": 0}) == key
    nb["cells"][-1]["source"] = ["# an edit\n"]  # ... a changed cell does
    copy.write_text(json.dumps(nb))
    assert run.cache_key(copy, {"profile": "cpu", "seed": 0}) != key
    monkeypatch.setattr(run, "source_digest", lambda chapter=None: "other ftbook source")
    assert run.cache_key(notebook, {"profile": "cpu", "seed": 0}) != key


def test_a_cached_execution_is_reused_not_rerun(tmp_home, monkeypatch):
    calls = []

    def fake_execute(src, dst, **kwargs):
        calls.append(kwargs["parameters"])
        shutil.copyfile(src, dst)

    import papermill

    monkeypatch.setattr(papermill, "execute_notebook", fake_execute)
    first = run.execute("01", profile="smoke", seed=5, log=lambda *_: None)
    second = run.execute("01", profile="smoke", seed=5, log=lambda *_: None)
    assert len(calls) == 1 and not first.cached and second.cached and first.path == second.path
    run.execute("01", profile="smoke", seed=5, parameters={"probe_facts": 4}, log=lambda *_: None)
    assert len(calls) == 2 and calls[1]["probe_facts"] == 4


def test_a_failed_execution_is_not_cached(tmp_home, monkeypatch):
    import papermill

    def failing(src, dst, **kwargs):
        shutil.copyfile(src, dst)
        raise papermill.PapermillExecutionError(1, 1, "x = 1", "ValueError", "boom", [])

    monkeypatch.setattr(papermill, "execute_notebook", failing)
    with pytest.raises(run.ChapterFailed, match="01_pretraining"):
        run.execute("01", profile="smoke", seed=6, log=lambda *_: None)
    assert not list(run.cache_dir().glob("*.ipynb"))


def test_seeds_read_as_ranges_or_lists():
    assert cli.parse_seeds("0-9") == list(range(10))
    assert cli.parse_seeds("0-2,7,1") == [0, 1, 2, 7]


def test_a_chapters_source_digest_ignores_the_other_chapters_labs_and_specs(tmp_path, monkeypatch):
    """After a change to one chapter's lab only that chapter's executions (and reference runs) are stale."""
    package = tmp_path / "ftbook"
    for rel in ("train.py", "labs/ch04_merging.py", "labs/ch06_forgetting.py", "specs/ch04_merging.py",
                "methods/merge.py"):
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(f"# {rel}\n")
    monkeypatch.setattr(run, "PACKAGE_DIR", package)
    monkeypatch.setattr(run, "REPO_ROOT", tmp_path)
    before = {ch: run.source_digest(ch) for ch in ("04_merging", "06_forgetting")}
    (package / "labs/ch06_forgetting.py").write_text("# changed\n")
    assert run.source_digest("04_merging") == before["04_merging"]
    assert run.source_digest("06_forgetting") != before["06_forgetting"]
    (package / "methods/merge.py").write_text("# changed\n")       # a method or core change: every chapter
    assert run.source_digest("04_merging") != before["04_merging"]


def test_reference_sweep_reuses_matching_runs_and_writes_results(tmp_home, tmp_path, monkeypatch):
    """A record made by the same code with the default knobs counts as a reference run (a killed sweep resumes);
    one made by other code, or with other knobs, does not."""
    from ftbook import records, reference, specs

    monkeypatch.setenv("FTBOOK_RESULTS", str(tmp_path / "results"))
    code = run.code_digest("01_pretraining")
    executed = []

    def write(seed, *, code=code, **knobs):
        cfg = specs.make("01", profile="cpu", seed=seed, **knobs)
        records.write_record(chapter="01_pretraining", profile="cpu", seed=seed, parameters=cfg.to_dict(),
                             metrics={}, started_at=0.0, code=code, claims=[
                                 {"id": "a", "paper": "P", "claim": "c", "measured": float(seed), "op": ">",
                                  "threshold": 0.5, "scale": "cpu", "holds": seed > 0.5}])

    def fake_execute(chapter, *, profile, seed, **kwargs):
        executed.append(seed)
        write(seed)

    write(0)
    write(1, code={"source": "older code", "notebook": code["notebook"]})
    write(2, probe_facts=8)
    monkeypatch.setattr(run, "execute", fake_execute)
    out = run.reference_sweep(["01"], seeds=[0, 1, 2, 3], log=lambda *_: None)
    assert sorted(executed) == [1, 2, 3]           # seed 0 reused; 1 (other code) and 2 (other knobs) re-run
    results = json.loads(out["01_pretraining"].read_text())
    assert results["seeds"] == [0, 1, 2, 3] and results["claims"][0]["held"] == 3
    assert reference.rates("01_pretraining")["a"]["values"] == [0.0, 1.0, 2.0, 3.0]
    executed.clear()
    run.reference_sweep(["01"], seeds=[0, 1, 2, 3], log=lambda *_: None)
    assert executed == []                          # everything done: nothing runs again


def test_results_from_records_of_another_code_keep_that_codes_digest(tmp_home, tmp_path, monkeypatch):
    from ftbook import records, reference, specs

    monkeypatch.setenv("FTBOOK_RESULTS", str(tmp_path / "results"))
    folder = tmp_path / "branch-records"
    for seed in range(3):
        cfg = specs.make("01", profile="cpu", seed=seed)
        records.write_record(chapter="01_pretraining", profile="cpu", seed=seed, parameters=cfg.to_dict(),
                             metrics={}, code={"source": "branch", "notebook": "nb"}, directory=folder, claims=[
                                 {"id": "a", "paper": "P", "claim": "c", "measured": 1.0, "op": ">",
                                  "threshold": 0.5, "scale": "cpu", "holds": True}])
    path = run.results_from_records("01", folder, seeds=[0, 1, 2])
    results = json.loads(path.read_text())
    assert results["code"]["source"] == "branch" and results["claims"][0]["held"] == 3
    assert reference.load("01_pretraining")["seeds"] == [0, 1, 2]
    with pytest.raises(run.ConfigError, match="seeds \\[3\\]"):
        run.results_from_records("01", folder, seeds=[0, 3])


def test_records_made_before_a_knob_existed_count_at_its_default_but_not_at_another_value(tmp_home, tmp_path,
                                                                                         monkeypatch):
    """A sweep made before a knob was added (e.g. `stand_ins`) is still the default-knob run; a record that has the
    knob at another value is not."""
    from ftbook import records, specs

    monkeypatch.setenv("FTBOOK_RESULTS", str(tmp_path / "results"))
    folder = tmp_path / "older-records"
    claim = {"id": "a", "paper": "P", "claim": "c", "measured": 1.0, "op": ">", "threshold": 0.5, "scale": "cpu",
             "holds": True}
    for seed in range(2):
        params = specs.make("01", profile="cpu", seed=seed).to_dict()
        del params["stand_ins"]
        if seed == 1:
            params["probe_facts"] = params["probe_facts"] * 2
        records.write_record(chapter="01_pretraining", profile="cpu", seed=seed, parameters=params, metrics={},
                             code={"source": "old", "notebook": "nb"}, directory=folder, claims=[claim])
    assert json.loads(run.results_from_records("01", folder, seeds=[0]).read_text())["seeds"] == [0]
    with pytest.raises(run.ConfigError, match="seeds \\[1\\]"):
        run.results_from_records("01", folder, seeds=[0, 1])


def test_a_chapter_refuses_several_processes_before_any_work(tmp_home, monkeypatch):
    """`accelerate launch -m ftbook.cli run ...` executed the whole notebook in every rank (chapter 1 deadlocked on
    the zoo's lock): a chapter runs on one device; chapters run side by side with --jobs."""
    from ftbook.config import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="'WORLD_SIZE'.*--jobs"):
        run.execute("01", profile="smoke")
    assert not (tmp_home / "executed").exists() and not (tmp_home / "records").exists()


def test_the_stand_in_and_code_path_flags_reach_the_chapter(monkeypatch):
    seen = {}
    monkeypatch.setattr(run, "execute", lambda chapter, **kw: seen.update(kw) or
                        run.Execution(chapter, {"seed": 0}, Path("x.ipynb"), True, 0.0))
    assert cli.main(["run", "04", "--profile", "smoke", "--code-path", "gpu", "--stand-ins"]) == 0
    assert seen["parameters"] == {"stand_ins": True, "code_path": "gpu"} and seen["profile"] == "smoke"
    assert cli.main(["run", "04", "--profile", "smoke", "--code-path", "gpux"]) == 2
