"""Claims: a paper's sentence, the value this run measured, the threshold fixed in advance, the verdict.

A chapter collects its claims in a :class:`ClaimBook`, shows the verdict table, and ends with
:meth:`ClaimBook.finish`, which writes the run record and — in strict mode — fails the run when a claim
checked at this scale does not hold. A claim that honestly needs GPU scale is declared with
``scale="gpu"``: it is measured and shown at every profile, but only judged at ``gpu``.
"""
from __future__ import annotations

import operator
import time
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd

OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


class ClaimFailed(AssertionError):
    """Raised in strict mode when a claim checked at this scale does not hold."""


@dataclass
class Claim:
    id: str
    paper: str
    claim: str
    measured: float
    op: str
    threshold: float
    scale: str = "cpu"          # "cpu": judged at cpu and gpu; "gpu": judged at gpu only
    holds: bool | None = None   # None: not judged at this profile
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ClaimBook:
    """The claims of one run of one chapter."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.claims: list[Claim] = []
        self.started_at = getattr(cfg, "_started_at", None) or time.time()

    def _judged_here(self, scale: str) -> bool:
        profile = self.cfg.profile
        if profile == "smoke":
            return False  # smoke runs check the code path, not the science
        return scale == "cpu" or profile == "gpu"

    def check(self, id: str, *, paper: str, claim: str, measured: float, op: str, threshold: float,
              scale: str = "cpu", note: str = "") -> Claim:
        """Record one claim. ``op`` compares measured to threshold: '>=', '>', '<=' or '<'."""
        if op not in OPS:
            raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
        if scale not in ("cpu", "gpu"):
            raise ValueError(f"scale must be 'cpu' or 'gpu', got {scale!r}")
        if any(c.id == id for c in self.claims):
            raise ValueError(f"claim id {id!r} is used twice")
        measured = float(measured)
        holds = bool(OPS[op](measured, threshold)) if self._judged_here(scale) else None
        item = Claim(id=id, paper=paper, claim=claim, measured=measured, op=op, threshold=float(threshold),
                     scale=scale, holds=holds, note=note)
        self.claims.append(item)
        return item

    def table(self) -> pd.DataFrame:
        rows = []
        for c in self.claims:
            verdict = {True: "holds", False: "does NOT hold", None: "not judged"}[c.holds]
            if c.holds is None and c.scale == "gpu" and self.cfg.profile != "smoke":
                verdict = "checked at gpu scale only"
            rows.append({"paper": c.paper, "claim": c.claim, "measured": round(c.measured, 4),
                         "threshold": f"{c.op} {c.threshold:g}", "verdict": verdict})
        return pd.DataFrame(rows)

    def failed(self) -> list[Claim]:
        return [c for c in self.claims if c.holds is False]

    def finish(self, metrics: dict | None = None, strict: bool | None = None):
        """Write the run record; then, in strict mode, raise if a judged claim does not hold."""
        from . import records

        strict = self.cfg.get("strict", False) if strict is None else strict
        path = records.write_record(
            chapter=self.cfg.chapter, profile=self.cfg.profile, seed=self.cfg.seed,
            parameters={k: v for k, v in self.cfg.to_dict().items() if not k.startswith("_")},
            metrics=metrics or {},
            claims=[c.as_dict() for c in self.claims], started_at=self.started_at,
        )
        failed = self.failed()
        if strict and failed:
            lines = "\n".join(f"  - [{c.id}] {c.claim}: measured {c.measured:.4g}, needs {c.op} {c.threshold:g}"
                              for c in failed)
            raise ClaimFailed(f"{len(failed)} claim(s) did not hold (record: {path}):\n{lines}")
        return path
