"""One JSON record per run, written atomically (PEFT method_comparison style).

A record holds what is needed to trust and reproduce a number: chapter, profile, parameters, seed,
metrics, claim verdicts, git sha, package versions, hardware, wall time and peak memory.
Records live in ``$FTBOOK_RECORDS`` (default ``$FTBOOK_HOME/records``).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1


def ftbook_home() -> Path:
    """Where caches live: ``$FTBOOK_HOME`` or ``~/.cache/ftbook``."""
    return Path(os.environ.get("FTBOOK_HOME") or Path.home() / ".cache" / "ftbook")


def records_dir() -> Path:
    return Path(os.environ.get("FTBOOK_RECORDS") or ftbook_home() / "records")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive lock on ``path`` (created if missing) while the block runs: two processes that would write the
    same cache entry (a zoo model, a stand-in) take turns, and the second finds it done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks (checkpoints, downloaded archives)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_sha() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = out.stdout.strip()
    if out.returncode != 0 or not sha:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("ftbook", "torch", "transformers", "accelerate", "peft", "datasets", "tokenizers", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _cpu_model() -> dict[str, Any]:
    """The CPU's name and its widest vector instructions (Linux): float results of the same seed can differ between
    an AVX2 and an AVX-512 machine, since the math libraries pick other kernels."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"cpu": platform.processor() or None}
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), None)
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    isa = "amx" if "amx_tile" in flags else "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else None
    return {"cpu": name, "vector_isa": isa}


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(),
                            "cpu_count": os.cpu_count(), **_cpu_model()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    except ImportError:
        pass
    return info


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (``getrusage``: Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def gpu_peak_mib() -> float | None:
    """The largest GPU memory this process's tensors held (``torch.cuda.max_memory_allocated``), or None without
    a GPU in use (it is not initialised just to ask)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)


def peak_rss_mb() -> float:
    """:func:`peak_rss_mib`, rounded for a run record."""
    return round(peak_rss_mib(), 1)


def _descendants(pid: int) -> list[int]:
    """Live descendant process ids of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # the command name may hold spaces and parentheses: the fields after its last ")" are safe
            parent_of[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # the process ended while we read
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parent_of.items() if parent in frontier]
        found += children
        frontier = children
    return found


def live_workers_peak_rss_mib() -> float:
    """The largest peak resident memory among this process's live descendant processes, in MiB (Linux)."""
    peak = 0.0
    for pid in _descendants(os.getpid()):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):   # the process's high-water mark of resident memory, in kB
                    peak = max(peak, int(line.split()[1]) / 1024)
        except (OSError, ValueError):
            continue
    return peak


_ENDED_WORKERS_PEAK_MIB = 0.0


def remember_workers_peak_rss() -> None:
    """Keep the live workers' peak memory before they exit (:meth:`ftbook.parallel.Pool.close` calls it)."""
    global _ENDED_WORKERS_PEAK_MIB
    _ENDED_WORKERS_PEAK_MIB = max(_ENDED_WORKERS_PEAK_MIB, live_workers_peak_rss_mib())


def workers_peak_rss_mib() -> float:
    """The largest peak resident memory among this process's worker processes, in MiB (0 without workers).

    A chapter's :class:`ftbook.parallel.Pool` workers train in processes of their own, so the run's own
    :func:`peak_rss_mib` leaves them out. ``getrusage(RUSAGE_CHILDREN)`` is no help: a forked child (a ``git``
    call) starts with its parent's resident pages and so reports the parent's size."""
    return max(_ENDED_WORKERS_PEAK_MIB, live_workers_peak_rss_mib())


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return value.item()
        except (ValueError, TypeError):
            pass
    if isinstance(value, float) and value != value:
        return None  # NaN is not JSON
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_record(*, chapter: str, profile: str, seed: int, parameters: dict, metrics: dict,
                 claims: Iterable[dict] = (), started_at: float | None = None,
                 directory: Path | None = None, code: dict | None = None) -> Path:
    """Write one run's record atomically; return its path."""
    now = time.time()
    record = {
        "schema": SCHEMA_VERSION,
        "chapter": chapter,
        "profile": profile,
        "seed": seed,
        "parameters": parameters,
        "metrics": metrics,
        "claims": list(claims),
        "git_sha": git_sha(),
        "code": code,          # digests of the notebook and the source the run executed (ftbook.run.code_digest)
        "versions": versions(),
        "hardware": hardware(),
        "started_at": started_at,
        "finished_at": now,
        "wall_time_s": round(now - started_at, 2) if started_at else None,
        "peak_rss_mb": peak_rss_mb(),
        "workers_peak_rss_mb": round(workers_peak_rss_mib(), 1) or None,   # None: the run had no workers
        "gpu_peak_mib": gpu_peak_mib(),   # None: the run used no GPU
    }
    directory = Path(directory or records_dir())
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int((now % 1) * 1e6):06d}"
    path = directory / f"{chapter}__{profile}__seed{seed}__{stamp}.json"
    atomic_write_text(path, json.dumps(_jsonable(record), indent=2, sort_keys=True))
    return path


def load_records(directory: Path | None = None) -> list[dict]:
    """Every readable record, oldest first (a half-written or foreign file is skipped)."""
    directory = Path(directory or records_dir())
    out = []
    for path in sorted(directory.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(rec, dict) and "chapter" in rec:
            rec["_path"] = str(path)
            out.append(rec)
    out.sort(key=lambda r: r.get("finished_at") or 0)
    return out


def latest_records(directory: Path | None = None) -> list[dict]:
    """The newest record of each (chapter, profile, seed)."""
    latest: dict[tuple, dict] = {}
    for rec in load_records(directory):
        latest[(rec["chapter"], rec["profile"], rec["seed"])] = rec
    return [latest[k] for k in sorted(latest)]
