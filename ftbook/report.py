"""The results dashboard: every claim against every recorded run (chapter × profile × seed)."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from . import records, reference

VERDICT = {True: "holds", False: "does NOT hold", None: "not judged"}


def claims_table(directory: Path | None = None) -> pd.DataFrame:
    """One row per claim per (newest) run: chapter, profile, seed, claim, measured, threshold, verdict."""
    rows = []
    for rec in records.latest_records(directory):
        for claim in rec.get("claims", []):
            verdict = VERDICT[claim.get("holds")]
            if claim.get("holds") is None and claim.get("scale") in ("scale", "gpu") and rec["profile"] != "smoke":
                verdict = "gpu scale only" if claim["scale"] == "gpu" else "scale and gpu only"
            rows.append({"chapter": rec["chapter"], "profile": rec["profile"], "seed": rec["seed"],
                         "id": claim["id"], "paper": claim["paper"], "claim": claim["claim"],
                         "measured": claim["measured"], "threshold": f"{claim['op']} {claim['threshold']:g}",
                         "verdict": verdict, "git": rec.get("git_sha"), "wall_s": rec.get("wall_time_s")})
    return pd.DataFrame(rows, columns=["chapter", "profile", "seed", "id", "paper", "claim", "measured",
                                       "threshold", "verdict", "git", "wall_s"])


def runs_table(directory: Path | None = None) -> pd.DataFrame:
    rows = [{"chapter": r["chapter"], "profile": r["profile"], "seed": r["seed"],
             "claims held": sum(c.get("holds") is True for c in r.get("claims", [])),
             "claims failed": sum(c.get("holds") is False for c in r.get("claims", [])),
             "wall time (s)": r.get("wall_time_s"), "peak RSS (MB)": r.get("peak_rss_mb"),
             "largest worker's peak RSS (MB)": r.get("workers_peak_rss_mb"),
             "git": r.get("git_sha"),
             "finished": time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.get("finished_at") or 0))}
            for r in records.latest_records(directory)]
    return pd.DataFrame(rows)


def _md_table(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "_No runs recorded yet._\n"
    cols = list(frame.columns)
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in frame.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            if v is None or (isinstance(v, float) and v != v):
                cells.append("—")          # not measured (e.g. no workers), not the string "nan"
            else:
                cells.append(f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|"))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _mark(holds, value) -> str:
    if holds is None:
        return "·" if value is None else f"{value:.3g}"
    return ("✓ " if holds else "✗ ") + ("—" if value is None else f"{value:.3g}")


def declared_claims(profile: str = "cpu", directory: Path | None = None) -> dict:
    """``{(chapter, claim id): {"standard", "scale"}}`` as each chapter's latest run at ``profile`` declared them."""
    out = {}
    for rec in records.latest_records(directory):
        if rec["profile"] == profile:
            out.update({(rec["chapter"], c["id"]): {"standard": c.get("standard", reference.STANDARD),
                                                    "scale": c.get("scale")} for c in rec.get("claims", [])})
    return out


def reference_table(profile: str = "cpu", declared: dict | None = None) -> pd.DataFrame:
    """One row per claim of every chapter with reference results: its rate and its value and verdict per seed."""
    declared = declared_claims(profile) if declared is None else declared
    rows = []
    for results in reference.all_results(profile):
        for c in results["claims"]:
            c = reference.as_declared(c, declared.get((results["chapter"], c["id"])))
            judged_here = reference.judged_at(c, profile)
            row = {"chapter": results["chapter"], "id": c["id"], "threshold": f"{c['op']} {c['threshold']:g}",
                   "held": reference.rate_text(c) if judged_here else
                   f"{c['scale']} only" + (f" ({reference.rate_text(c)} at {profile})" if c.get("judged") else ""),
                   "standard": f"{c.get('standard', reference.STANDARD):.0%}" if judged_here else "—",
                   "meets it": {True: "yes", False: "NO", None: "—"}[reference.meets_standard(c) if judged_here
                                                                      else None]}
            row.update({f"seed {s}": _mark(h, v) for s, v, h in zip(c["seeds"], c["values"], c["holds"])})
            rows.append(row)
    return pd.DataFrame(rows)


def reference_summary(profile: str = "cpu") -> str:
    """One sentence for the book's intro: how many claims meet the standard in the reference runs."""
    t = reference.totals(profile, declared_claims(profile))
    if not t["claims"]:
        return "_No reference runs are recorded yet (`ftbook reference --all`)._"
    rates = (f" ({t['stated_as_rates']} of them stated as rates, e.g. \"holds in at least 7 of 10 seeds\", where the "
             f"effect is weak at this scale)") if t["stated_as_rates"] else ""
    return (f"In the reference runs (every chapter at seeds 0–9, `{profile}` profile), **{t['meeting']} of the "
            f"{t['claims']} claims judged at `{profile}`** meet their standard — at least 9 of 10 seeds{rates} — and "
            f"{t['every_run']} hold in every one ({t['chapters']} chapters). Each chapter's claims table gives the "
            f"rate beside this run's verdict; the [results page](results.md) has every value.")


def reference_text(profile: str = "cpu") -> str:
    """The reference rates for ``ftbook report`` / ``ftbook reference``."""
    table = reference_table(profile)
    if table.empty:
        return f"no reference results in {reference.results_dir() / profile} (run `ftbook reference --all`)"
    view = table[["chapter", "id", "threshold", "held", "standard", "meets it"]]
    with pd.option_context("display.width", 160, "display.max_rows", 500, "display.max_colwidth", 60):
        return f"reference runs ({profile}):\n" + view.to_string(index=False)


def markdown(directory: Path | None = None) -> str:
    """The book's results page (``book/results.md``): the reference runs, then every recorded run."""
    claims = claims_table(directory)
    parts = ["# Results: every claim, every run", "", reference_summary("cpu"), ""]
    ref = reference_table("cpu")
    if not ref.empty:
        parts += ["## Reference runs: every claim at seeds 0–9", "",
                  "From the committed `results/cpu/*.json` (`ftbook reference --all`). ✓ the claim held at that seed, "
                  "✗ it did not, with the measured value; `gpu only` claims are measured but judged at scale. A claim "
                  "judged at `cpu` must hold in at least 9 of 10 seeds.", "", _md_table(ref), ""]
        runs = [{"chapter": r["chapter"], "seeds": len(r["runs"]),
                 "median wall time (s)": float(pd.Series([x["wall_time_s"] for x in r["runs"]]).median()),
                 "largest peak RSS (MB)": max((x["peak_rss_mb"] or 0) for x in r["runs"]),
                 "largest worker's peak RSS (MB)": max((x.get("workers_peak_rss_mb") or 0) for x in r["runs"]) or None,
                 "git": (r.get("code") or {}).get("git"), "hardware": (r.get("hardware") or {}).get("machine")}
                for r in reference.all_results("cpu")]
        parts += ["### The reference runs' cost", "", _md_table(pd.DataFrame(runs)), ""]
    parts += ["## Runs recorded while building this book", "",
             "Generated by `ftbook book` / `ftbook report` from the run records (one JSON per run, in "
             "`$FTBOOK_HOME/records`). A claim is judged at the profile it is checked at; `smoke` runs "
             "check the code path only. Re-run a chapter with another seed "
             "(`ftbook run 01 --seed 1`) and rebuild to add a column.", ""]
    if not claims.empty:
        judged = claims[claims.profile != "smoke"].copy()
        if not judged.empty:
            judged["run"] = judged.profile + " / seed " + judged.seed.astype(str)
            wide = judged.pivot_table(index=["chapter", "claim"], columns="run", values="verdict",
                                      aggfunc="first").reset_index()
            parts += ["### Verdicts by run", "", _md_table(wide), ""]
        parts += ["### Measured values", "",
                  _md_table(claims[["chapter", "profile", "seed", "paper", "claim", "measured", "threshold",
                                    "verdict"]]), ""]
    parts += ["### Runs", "", _md_table(runs_table(directory))]
    return "\n".join(parts)


def text(directory: Path | None = None) -> str:
    """A terminal version for ``ftbook report``."""
    claims = claims_table(directory)
    if claims.empty:
        return f"no run records in {records.records_dir() if directory is None else directory}"
    view = claims[["chapter", "profile", "seed", "claim", "measured", "threshold", "verdict"]]
    with pd.option_context("display.width", 160, "display.max_rows", 500, "display.max_colwidth", 60):
        return view.to_string(index=False)
