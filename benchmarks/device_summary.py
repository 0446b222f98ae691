"""Read what a device check measured (benchmarks/device_check.py) into one summary: ``summarize(out, home, steps)``;
``python benchmarks/device_summary.py SUMMARY.json`` prints it as markdown (for the notes and book/setup.md)."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _records(folder: Path) -> list[dict]:
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def summarize(out: Path, home: Path, steps: dict) -> dict:
    summary = dict(steps)
    runs = []
    for rec in _records(out / "records"):
        runs.append({"chapter": rec["chapter"], "profile": rec["profile"], "seed": rec["seed"],
                     "code_path": rec.get("parameters", {}).get("code_path", ""),
                     "wall_time_s": rec.get("wall_time_s"), "gpu_peak_mib": rec.get("gpu_peak_mib"),
                     "peak_rss_mb": rec.get("peak_rss_mb"), "hardware": rec.get("hardware"),
                     "claims": [{k: c.get(k) for k in ("id", "measured", "op", "threshold", "scale", "holds")}
                                for c in rec.get("claims", [])]})
    summary["runs"] = runs
    summary["claims"] = [{"chapter": r["chapter"], **c} for r in runs for c in r["claims"]]
    zoo = []
    for info_path in sorted((home / "zoo").glob("*/info.json")):
        info = json.loads(info_path.read_text())
        zoo.append({"entry": info_path.parent.name, **{k: info.get(k) for k in (
            "name", "seed", "parameters", "train_tokens", "train_seconds", "tokens_per_second",
            "model_tflops_per_second", "mfu", "train_device", "train_precision")}})
    summary["zoo"] = zoo
    calibration = out / "calibration.json"
    summary["calibration"] = json.loads(calibration.read_text()) if calibration.exists() else None
    log = out / "pytest.log"
    if log.exists():
        tail = [line for line in log.read_text().splitlines() if "passed" in line or "failed" in line]
        summary["unit_tests"] = tail[-1] if tail else None
    return summary


def markdown(summary: dict) -> str:
    lines = [f"Device check ({summary.get('mode')}), {summary.get('total_seconds')} s in all.", ""]
    lines.append(f"Unit tests: {summary.get('unit_tests')}")
    cal = summary.get("calibration") or {}
    if cal.get("workloads"):
        lines += ["", f"Calibration on {cal.get('device')} (torch {cal.get('torch')}):", "",
                  "| workload | batch x tokens | accum / ckpt | precision | s/step | tokens/s | MFU | peak GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for w in cal["workloads"]:
            if "out_of_memory" in w:
                lines.append(f"| {w['shape']} | {w['batch']} x {w['seq_len']} | | | out of memory | | | |")
                continue
            mfu = f"{w['mfu']:.1%}" if w.get("mfu") is not None else "—"
            lines.append(f"| {w['workload']} | {w['batch']} x {w['seq_len']} | {w['grad_accum']} / "
                         f"{'yes' if w['gradient_checkpointing'] else 'no'} | {w['precision']} | "
                         f"{w['seconds_per_step']} | {w['tokens_per_second']:,.0f} | {mfu} | {w['peak_memory_gib']} |")
    if summary.get("zoo"):
        lines += ["", "| zoo entry | parameters | tokens | seconds | tokens/s | MFU | device, precision |",
                  "|---|---|---|---|---|---|---|"]
        for z in summary["zoo"]:
            mfu = f"{z['mfu']:.1%}" if z.get("mfu") is not None else "—"
            lines.append(f"| {z['entry']} | {z['parameters']:,} | {z['train_tokens']:,} | {z['train_seconds']} | "
                         f"{z['tokens_per_second']:,.0f} | {mfu} | {z['train_device']}, {z['train_precision']} |")
    chapters = summary.get("chapters") or {}
    if chapters:
        lines += ["", "| chapter | outcome | seconds |", "|---|---|---|"]
        for chapter, c in sorted(chapters.items()):
            outcome = "not started" if c.get("not_started") else "stopped at the deadline" if \
                c.get("stopped_at_deadline") else "ran" if c.get("rc") == 0 else f"failed (rc {c.get('rc')})"
            lines.append(f"| {chapter} | {outcome} | {c.get('seconds')} |")
    claims = summary.get("claims") or []
    if claims:
        lines += ["", "| chapter | claim | judged at | measured | threshold | verdict |", "|---|---|---|---|---|---|"]
        for c in claims:
            verdict = {True: "holds", False: "does not hold", None: "not judged"}[c["holds"]]
            measured = "—" if c["measured"] is None else f"{c['measured']:.4g}"
            lines.append(f"| {c['chapter']} | {c['id']} | {c['scale']} | {measured} | "
                         f"{c['op']} {c['threshold']:g} | {verdict} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
