"""Execute chapters with papermill (with an execution cache), build the book, write the results page.

The execution cache: an executed notebook is stored under a key that hashes the notebook's cells, the
parameters, the ftbook source and the committed data. Re-running with nothing changed reuses it, so
``make test`` (which executes the chapters to check their claims) followed by ``make book`` executes
nothing twice, and editing one chapter re-executes only that chapter. Failed runs are never cached.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import specs
from .config import ConfigError
from .records import atomic_write_text, ftbook_home

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
KERNEL = "python3"


class ChapterFailed(RuntimeError):
    """A chapter raised while executing; the message names the chapter, the cell and the error."""


def chapters_dir() -> Path:
    return Path(os.environ.get("FTBOOK_CHAPTERS") or REPO_ROOT / "chapters")


def book_dir() -> Path:
    return Path(os.environ.get("FTBOOK_BOOK") or REPO_ROOT / "book")


def cache_dir() -> Path:
    return Path(os.environ.get("FTBOOK_EXEC_CACHE") or ftbook_home() / "executed")


def notebook_path(chapter: str) -> Path:
    """``01`` / ``01_pretraining`` / a path → the chapter's notebook."""
    as_path = Path(chapter)
    if as_path.suffix == ".ipynb" and as_path.exists():
        return as_path
    spec = specs.resolve(chapter)
    path = chapters_dir() / f"{spec.name}.ipynb"
    if not path.exists():
        raise ConfigError("chapter", f"chapter {spec.name} is configured but {path} does not exist")
    return path


def all_chapters() -> list[Path]:
    """The chapters present, in book order (their number prefix)."""
    return sorted(chapters_dir().glob("[0-9][0-9]_*.ipynb"))


# --- the cache key ----------------------------------------------------------------------------------
def _tree_digest(root: Path, patterns: Iterable[str]) -> str:
    h = hashlib.sha256()
    if root.exists():
        files = sorted({p for pattern in patterns for p in root.rglob(pattern) if p.is_file()})
        for path in files:
            if "__pycache__" in path.parts:
                continue
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def source_digest(chapter: str | None = None) -> str:
    """What a chapter's results depend on besides its notebook: the core package, the methods, the committed data,
    and the chapter's own spec and lab — not the other chapters' (a lab never imports another lab: the layer test
    holds this), so a change to one chapter re-executes that chapter only. ``None``: the whole package."""
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        rel = path.relative_to(PACKAGE_DIR)
        if "__pycache__" in rel.parts:
            continue
        if chapter is not None and rel.parts[0] in ("labs", "specs") and rel.stem.startswith("ch") \
                and rel.stem != f"ch{chapter}":
            continue
        h.update(str(rel).encode())
        h.update(path.read_bytes())
    h.update(_tree_digest(REPO_ROOT / "data", ["*"]).encode())
    return h.hexdigest()


def notebook_digest(path: Path) -> str:
    """The cells' sources and tags: outputs and execution counts do not change what runs."""
    nb = json.loads(Path(path).read_text())
    cells = [(c["cell_type"], "".join(c["source"]), sorted(c.get("metadata", {}).get("tags", [])))
             for c in nb["cells"]]
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def code_digest(chapter: str) -> dict:
    """What a run of ``chapter`` executes: its notebook's cells and the source it depends on (run records keep
    this, so a reference run can be matched to the code that made it)."""
    path = chapters_dir() / f"{chapter}.ipynb"
    return {"source": source_digest(chapter), "notebook": notebook_digest(path) if path.exists() else None}


def cache_key(path: Path, parameters: Mapping[str, Any]) -> str:
    blob = json.dumps({"notebook": notebook_digest(path), "parameters": dict(parameters),
                       "source": source_digest(Path(path).stem)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


# --- executing --------------------------------------------------------------------------------------
@dataclass
class Execution:
    chapter: str
    parameters: dict
    path: Path          # the executed notebook
    cached: bool
    seconds: float


def _cell_error(nb_path: Path) -> str:
    """The first error in an executed notebook, as 'cell N: Name: message'."""
    try:
        nb = json.loads(nb_path.read_text())
    except (OSError, json.JSONDecodeError):
        return "(the executed notebook could not be read)"
    for i, cell in enumerate(nb["cells"]):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"cell {i}: {out.get('ename')}: {out.get('evalue')}"
    return "(no error output found)"


def execute(chapter: str, *, profile: str = "cpu", seed: int = 0, parameters: Mapping[str, Any] | None = None,
            output: Path | None = None, use_cache: bool = True, progress: bool = False,
            log=print) -> Execution:
    """Execute one chapter with papermill; reuse the cached result when nothing it depends on changed.

    Parameters are validated first: a bad one raises :class:`ftbook.config.ConfigError` before any work.
    """
    import papermill

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # `accelerate launch -m ftbook.cli run ...` would execute the whole notebook in every rank (and deadlock on
        # the zoo's lock): a chapter runs on one device; run chapters side by side with --jobs instead.
        raise ConfigError("WORLD_SIZE", "a chapter runs in one process on one device; run several chapters side by "
                                        "side with `ftbook run --all --jobs N` instead of `accelerate launch`")
    # Kernels inherit the environment: no per-step progress bars inside executed notebooks
    # (papermill's own per-cell bar, `--progress`, shows where a run is).
    os.environ.setdefault("FTBOOK_PROGRESS", "0")
    path = notebook_path(chapter)
    name = path.stem
    clean = specs.validate(name, profile, dict(parameters or {}))  # raises before any work
    params = {"profile": profile, "seed": seed, **clean}
    key = cache_key(path, params)
    cached = cache_dir() / f"{name}__{profile}__seed{seed}__{key}.ipynb"
    started = time.perf_counter()
    if use_cache and cached.exists():
        log(f"[ftbook] {name} ({profile}, seed {seed}): cached, not re-executed")
        result = Execution(name, params, cached, True, 0.0)
    else:
        log(f"[ftbook] {name} ({profile}, seed {seed}): executing ...")
        work = cache_dir() / "work" / f"{name}__{profile}__seed{seed}__{key}__{os.getpid()}.ipynb"
        work.parent.mkdir(parents=True, exist_ok=True)
        try:
            papermill.execute_notebook(str(path), str(work), parameters=params, kernel_name=KERNEL,
                                       progress_bar=progress, cwd=str(path.parent), log_output=False)
        except papermill.PapermillExecutionError as exc:
            failed = cache_dir() / "failed" / f"{name}__{profile}__seed{seed}.ipynb"
            failed.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(work), failed)
            raise ChapterFailed(f"chapter {name} ({profile}, seed {seed}) failed in "
                                f"{_cell_error(failed)}\n  executed notebook kept at {failed}") from exc
        if use_cache:
            os.replace(work, cached)  # atomic: the cache never holds half a notebook
            result_path = cached
        else:
            result_path = work
        result = Execution(name, params, result_path, False, time.perf_counter() - started)
        log(f"[ftbook] {name} ({profile}, seed {seed}): done in {result.seconds:.0f} s")
    if output is not None:
        output = Path(output)
        output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(result.path, output)
        result.path = output
    return result


def execute_many(chapters: Iterable[str], *, jobs: int = 1, **kwargs) -> list[Execution]:
    """Execute several chapters, ``jobs`` at a time (each kernel is its own process).

    On 2 cores, two single-threaded kernels side by side beat one kernel with two threads for these
    small models (see benchmarks/README.md). All chapters run even if one fails; then the first
    failure is raised.
    """
    chapters = list(chapters)
    for chapter in chapters:  # validate everything before executing anything
        specs.validate(notebook_path(chapter).stem, kwargs.get("profile", "cpu"),
                             dict(kwargs.get("parameters") or {}))
    results: list[Execution | BaseException] = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(execute, ch, **kwargs) for ch in chapters]
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as exc:  # noqa: BLE001 - re-raised below after the others finish
                results.append(exc)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


# --- the book ---------------------------------------------------------------------------------------
def write_toc(chapter_names: list[str], book: Path) -> None:
    lines = ["# Generated by `ftbook book` from the chapters present; do not edit.", "format: jb-book",
             "root: intro", "parts:", "  - caption: The book", "    chapters:"]
    lines += [f"      - file: chapters/{name}" for name in chapter_names]
    lines += ["  - caption: Around the book", "    chapters:", "      - file: setup", "      - file: results"]
    atomic_write_text(book / "_toc.yml", "\n".join(lines) + "\n")


def build_book(*, profile: str = "cpu", seed: int = 0, jobs: int = 1, execute_chapters: bool = True,
               log=print) -> Path:
    """Execute every chapter (cached), render the Jupyter Book (1.x); return the HTML folder."""
    from . import report

    book = book_dir()
    chapters = all_chapters()
    executed_dir = book / "chapters"
    if executed_dir.exists():
        shutil.rmtree(executed_dir)
    executed_dir.mkdir(parents=True)
    if execute_chapters:
        runs = execute_many([str(p) for p in chapters], jobs=jobs, profile=profile, seed=seed, log=log)
        for run in runs:
            shutil.copyfile(run.path, executed_dir / f"{run.chapter}.ipynb")
    else:  # render the unexecuted notebooks (for a quick look at the text)
        for path in chapters:
            shutil.copyfile(path, executed_dir / path.name)
    write_toc([p.stem for p in chapters], book)
    atomic_write_text(book / "results.md", report.markdown())
    atomic_write_text(book / "reference_summary.md", report.reference_summary(profile) + "\n")  # the intro includes it
    log("[ftbook] rendering the book with jupyter-book ...")
    started = time.perf_counter()
    # jupyter-book 1.x has no `python -m` entry: use the script installed beside this interpreter.
    script = Path(sys.executable).parent / "jupyter-book"
    if not script.exists():
        script = Path(shutil.which("jupyter-book") or "jupyter-book")
    cmd = [str(script), "build", str(book), "--warningiserror", "--keep-going"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-40:])
        raise RuntimeError(f"jupyter-book build failed:\n{tail}")
    html = book / "_build" / "html"
    log(f"[ftbook] book rendered in {time.perf_counter() - started:.0f} s: {html / 'index.html'}")
    return html


# --- reference runs ---------------------------------------------------------------------------------
def _matching_record(chapter: str, profile: str, seed: int, code: dict | None, runs: list[dict]) -> dict | None:
    """The newest record of ``chapter`` at ``seed`` made by this code (any code if ``code`` is None) with the
    profile's default knobs. A knob the record does not have was added after it was made: that run behaved as the
    knob's default does (a new knob's default keeps the old behaviour), so it counts as set to it."""
    defaults = {k: v for k, v in specs.make(chapter, profile, seed).to_dict().items() if k != "device"}
    for rec in reversed(runs):
        if (rec.get("chapter"), rec.get("profile"), rec.get("seed")) != (chapter, profile, seed):
            continue
        params = rec.get("parameters", {})
        if (code is None or rec.get("code") == code) and all(params.get(k, v) == v for k, v in defaults.items()):
            return rec
    return None


def results_from_records(chapter: str, directory: Path, *, seeds: Iterable[int] = tuple(range(10)),
                         profile: str = "cpu") -> Path:
    """Write a chapter's reference results from the newest default-knob records in ``directory``, whatever code
    made them (e.g. a sweep run on a branch before a merge). The results keep that code's digests and git sha;
    the chapter tests then check that this code reproduces their seed-0 values."""
    from . import records, reference

    name = specs.resolve(notebook_path(chapter).stem).name
    recorded = records.load_records(Path(directory))
    runs = [_matching_record(name, profile, s, None, recorded) for s in seeds]
    missing = [s for s, r in zip(seeds, runs) if r is None]
    if missing:
        raise ConfigError("seeds", f"{directory} has no default-knob {profile} record of {name} at seeds {missing}")
    code = {**(runs[-1].get("code") or {}), "git": runs[-1].get("git_sha")}
    path = reference.results_path(name, profile)
    atomic_write_text(path, reference.dumps(reference.summarize(runs, chapter=name, profile=profile, code=code)))
    return path


def reference_sweep(chapters: Iterable[str], *, seeds: Iterable[int] = tuple(range(10)), profile: str = "cpu",
                    jobs: int = 1, write: bool = True, log=print) -> dict[str, Path | None]:
    """Run every chapter at every reference seed with its default knobs and write ``results/<profile>/<ch>.json``.

    What is already done is reused: a run whose record was made by the same code (the chapter's notebook and the
    source it depends on) and the default knobs counts, whether a sweep, ``make test`` or ``ftbook run`` made it —
    so a killed sweep resumes where it stopped, and after a change to one chapter only that chapter runs again.
    Claims never stop a reference run (a claim that does not hold is a result). Returns ``{chapter: results path}``
    (None for a chapter some of whose runs failed)."""
    from concurrent.futures import ThreadPoolExecutor

    from . import records, reference

    names = [specs.resolve(notebook_path(ch).stem).name for ch in chapters]   # validate before any work
    seeds = list(seeds)
    codes = {name: code_digest(name) for name in names}
    recorded = records.load_records()
    done = {(n, s): _matching_record(n, profile, s, codes[n], recorded) for n in names for s in seeds}
    # seed by seed: every chapter's rate builds up together, and a seed's zoo models are pre-trained once, early
    todo = sorted((key for key, rec in done.items() if rec is None),
                  key=lambda k: (seeds.index(k[1]), names.index(k[0])))
    log(f"[reference] {len(done) - len(todo)} of {len(done)} runs reused; {len(todo)} to run, {jobs} at a time")
    started, finished = time.perf_counter(), [0]

    def one(key):
        name, seed = key
        execute(name, profile=profile, seed=seed, log=lambda *a: None)
        record = _matching_record(name, profile, seed, codes[name], records.load_records())
        if record is None:  # the notebook was cached but its record is gone: run it again
            execute(name, profile=profile, seed=seed, use_cache=False, log=lambda *a: None)
            record = _matching_record(name, profile, seed, codes[name], records.load_records())
        finished[0] += 1
        elapsed = time.perf_counter() - started
        log(f"[reference] {name} seed {seed}: done ({finished[0]}/{len(todo)}, {elapsed / 60:.1f} min, "
            f"about {elapsed / finished[0] * (len(todo) - finished[0]) / 60:.0f} min left)")
        return record

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {key: pool.submit(one, key) for key in todo}
        for key, future in futures.items():
            try:
                done[key] = future.result()
            except Exception as exc:  # noqa: BLE001 - one broken run must not lose the others
                log(f"[reference] {key[0]} seed {key[1]} FAILED: {exc}")
    out: dict[str, Path | None] = {}
    for name in names:
        runs = [done[(name, s)] for s in seeds]
        if any(r is None for r in runs) or not write:
            out[name] = None
            continue
        results = reference.summarize(runs, chapter=name, profile=profile,
                                      code={**codes[name], "git": runs[-1].get("git_sha")})
        out[name] = reference.results_path(name, profile)
        atomic_write_text(out[name], reference.dumps(results))
        log(f"[reference] {name}: {out[name]}")
    return out
