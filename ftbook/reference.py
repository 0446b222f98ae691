"""Reference results: every claim of a chapter over the reference seeds 0–9, one committed JSON per chapter and profile.

A verdict from one run at one seed says little; the book's standard is a rate. ``ftbook reference`` (see
:func:`ftbook.run.reference_sweep`) runs a chapter at every reference seed and :func:`summarize` turns the runs'
records into ``results/<profile>/<chapter>.json``::

    {"chapter": "04_merging", "profile": "cpu", "seeds": [0, ..., 9],
     "code": {"git": ..., "source": ...},          # the code the runs executed
     "claims": [{"id": ..., "claim": ..., "op": ">", "threshold": 0.0, "scale": "cpu",
                 "values": [...], "holds": [true, ...], "held": 9, "judged": 10}, ...],
     "runs": [{"seed": 0, "wall_time_s": ..., "peak_rss_mb": ..., "workers_peak_rss_mb": ...}, ...],
     "versions": {...}, "hardware": {...}}

A claim *meets the standard* when it holds in at least :data:`STANDARD` of the reference runs that judged it.
:class:`ftbook.claims.ClaimBook` shows each claim's rate beside this run's verdict.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

REFERENCE_SEEDS = tuple(range(10))
STANDARD = 0.9          # a claim judged at cpu holds in >= 9 of 10 reference seeds
REPO_ROOT = Path(__file__).resolve().parent.parent


def results_dir() -> Path:
    """Where the committed reference results live: ``$FTBOOK_RESULTS`` or ``results/`` in the repository."""
    return Path(os.environ.get("FTBOOK_RESULTS") or REPO_ROOT / "results")


def results_path(chapter: str, profile: str = "cpu") -> Path:
    return results_dir() / profile / f"{chapter}.json"


def load(chapter: str, profile: str = "cpu") -> dict | None:
    """The chapter's reference results at ``profile``, or None if there are none (yet)."""
    path = results_path(chapter, profile)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def rates(chapter: str, profile: str = "cpu") -> dict[str, dict]:
    """``{claim id: {"held": k, "judged": n, "values": [...], "holds": [...]}}`` from the reference results."""
    results = load(chapter, profile)
    return {c["id"]: c for c in results["claims"]} if results else {}


def rate_text(entry: dict | None) -> str:
    """``"9/10"`` for a claim judged in reference runs, ``"—"`` otherwise."""
    if not entry or not entry.get("judged"):
        return "—"
    return f"{entry['held']}/{entry['judged']}"


def held_in_every_run(entry: dict | None) -> bool:
    """True when the reference runs judged the claim and it held in all of them (or when there are none: a claim
    without reference runs is held to the strictest standard)."""
    if not entry or not entry.get("judged"):
        return True
    return entry["held"] == entry["judged"]


def meets_standard(entry: dict | None, standard: float | None = None) -> bool | None:
    """Whether a judged claim holds in at least its standard share of its reference runs — :data:`STANDARD`, or the
    lower rate a claim stated as a rate declares (``standard``: the chapter's current declaration, which wins over
    the one recorded with the runs). None: not judged there."""
    if not entry or not entry.get("judged"):
        return None
    standard = entry.get("standard", STANDARD) if standard is None else standard
    return entry["held"] >= standard * entry["judged"] - 1e-9


def judged_at(entry: dict, profile: str = "cpu") -> bool:
    """Whether a claim has reference runs and its scale is judged at ``profile``: a claim of scale ``"scale"`` is judged
    at the scale and gpu profiles, not at cpu (its cpu runs stay a measurement)."""
    from .config import judged_at_scale

    return bool(entry.get("judged")) and judged_at_scale(entry.get("scale") or "cpu", profile)


def as_declared(entry: dict, declared: dict | None) -> dict:
    """A results entry with the standard and scale the chapter's code declares now (``declared``: from its latest
    run record; a claim restated after the reference runs keeps its measured values and rate)."""
    if not declared:
        return entry
    return {**entry, "standard": declared.get("standard", entry.get("standard", STANDARD)),
            "scale": declared.get("scale", entry.get("scale"))}


def summarize(runs: Iterable[dict], *, chapter: str, profile: str, code: dict) -> dict:
    """The results file from one record per seed (the records :func:`ftbook.records.write_record` writes)."""
    runs = sorted(runs, key=lambda r: r["seed"])
    claims: dict[str, dict] = {}
    for run in runs:
        for c in run["claims"]:
            entry = claims.setdefault(c["id"], {
                "id": c["id"], "paper": c["paper"], "claim": c["claim"], "op": c["op"],
                "threshold": c["threshold"], "scale": c["scale"], "standard": c.get("standard", STANDARD),
                "seeds": [], "values": [], "holds": []})
            entry["seeds"].append(run["seed"])
            entry["values"].append(c["measured"])
            entry["holds"].append(c["holds"])
    for entry in claims.values():
        judged = [h for h in entry["holds"] if h is not None]
        entry["held"], entry["judged"] = sum(judged), len(judged)
    last = runs[-1] if runs else {}
    return {"chapter": chapter, "profile": profile, "seeds": [r["seed"] for r in runs], "code": code,
            "claims": list(claims.values()),
            "runs": [{"seed": r["seed"], "git": r.get("git_sha"), "wall_time_s": r.get("wall_time_s"),
                      "peak_rss_mb": r.get("peak_rss_mb"), "workers_peak_rss_mb": r.get("workers_peak_rss_mb")}
                     for r in runs],
            "versions": last.get("versions"), "hardware": last.get("hardware")}


def dumps(results: dict) -> str:
    """Compact, diff-friendly JSON: one line per claim and per run."""
    head = {k: v for k, v in results.items() if k not in ("claims", "runs")}
    lines = ["{"]
    for key, value in head.items():
        lines.append(f" {json.dumps(key)}: {json.dumps(value, sort_keys=True)},")
    for key in ("claims", "runs"):
        items = results.get(key, [])
        lines.append(f' "{key}": [')
        lines += [f"  {json.dumps(item, sort_keys=True)}" + ("," if i < len(items) - 1 else "")
                  for i, item in enumerate(items)]
        lines.append(" ]," if key == "claims" else " ]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def all_results(profile: str = "cpu") -> list[dict]:
    """Every chapter's reference results at ``profile``, in book order."""
    folder = results_dir() / profile
    out = []
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def totals(profile: str = "cpu", declared: dict | None = None) -> dict:
    """How many claims judged at ``profile`` meet the standard, over every chapter with reference results
    (``declared``: ``{(chapter, id): {"standard", "scale"}}`` as the chapters' code states them now)."""
    declared = declared or {}
    entries = [as_declared(c, declared.get((r["chapter"], c["id"]))) for r in all_results(profile) for c in r["claims"]]
    judged = [c for c in entries if judged_at(c, profile)]
    meeting = [c for c in judged if meets_standard(c)]
    return {"chapters": len(all_results(profile)), "claims": len(judged), "meeting": len(meeting),
            "every_run": sum(c["held"] == c["judged"] for c in judged),
            "stated_as_rates": sum(c.get("standard", STANDARD) < STANDARD for c in judged)}
