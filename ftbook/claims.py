"""Claims: a paper's sentence, the value this run measured, the threshold fixed in advance, the verdict.

A chapter collects its claims in a :class:`ClaimBook`, shows the verdict table beside each claim's rate in the
reference runs (seeds 0–9, :mod:`ftbook.reference`), plots the reference values against the threshold
(:meth:`ClaimBook.reference_figure`), and ends with :meth:`ClaimBook.finish`, which writes the run record. A claim
that does not hold in this run is a verdict on the page, not a crash; with ``strict=True`` the run fails when a
claim that held in *every* reference run does not hold (what the chapter tests check at seed 0). A claim that
honestly needs more scale is declared with ``scale="scale"`` (judged at the ``scale`` and ``gpu`` profiles: the
book's own world and models, bigger) or ``scale="gpu"`` (only with real pre-trained hub models): it is measured and
shown at every profile, but judged only there. A chapter's spec may also list claims declared ``"gpu"`` that its
``scale`` profile judges (``ChapterSpec.judged_at_scale``). Runs on stand-ins (``stand_ins=True``: tiny local models
and datasets in place of the hub's) judge nothing: their verdicts read "stand-in: not judged".
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
    scale: str = "cpu"          # the smallest profile that judges it: "cpu" (and every larger), "scale" or "gpu"
    holds: bool | None = None   # None: not judged at this profile
    note: str = ""
    standard: float = 0.9       # share of the reference runs it must hold in (a claim stated as a rate sets less)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class ClaimBook:
    """The claims of one run of one chapter."""

    def __init__(self, cfg):
        from . import reference

        self.cfg = cfg
        self.claims: list[Claim] = []
        self.started_at = getattr(cfg, "_started_at", None) or time.time()
        # the profile's reference runs; smoke runs compare with nothing
        self.stand_ins = bool(cfg.get("stand_ins", False))
        judged = cfg.profile != "smoke" and not self.stand_ins
        self.reference = reference.rates(cfg.chapter, cfg.profile) if judged else {}

    def _scale_of(self, id: str, scale: str) -> str:
        """The claim's scale, moved down to "scale" when the chapter's spec says the scale profile judges it."""
        if scale == "gpu":
            from . import specs
            from .config import ConfigError

            try:
                if id in specs.resolve(self.cfg.chapter).judged_at_scale:
                    return "scale"
            except ConfigError:  # a chapter without a spec: the claim keeps its own scale
                pass
        return scale

    def _judged_here(self, scale: str) -> bool:
        from .config import judged_at_scale

        # smoke runs check the code path (judged_at_scale says no), stand-ins are not the models the claims are about
        return not self.stand_ins and judged_at_scale(scale, self.cfg.profile)

    def check(self, id: str, *, paper: str, claim: str, measured: float, op: str, threshold: float,
              scale: str = "cpu", note: str = "", standard: float = 0.9) -> Claim:
        """Record one claim. ``op`` compares measured to threshold: '>=', '>', '<=' or '<'.

        ``standard``: the share of the reference runs (seeds 0–9) the claim must hold in — the book's 9 of 10 by
        default; a claim whose effect is weak at this scale may be stated as a rate ("holds in at least 7 of 10
        seeds", ``standard=0.7``), decided before the reference runs."""
        if op not in OPS:
            raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")
        from .config import SCALES

        if scale not in SCALES:
            raise ValueError(f"scale must be one of {', '.join(map(repr, SCALES))}, got {scale!r}")
        scale = self._scale_of(id, scale)
        if any(c.id == id for c in self.claims):
            raise ValueError(f"claim id {id!r} is used twice")
        if not 0 < standard <= 1:
            raise ValueError(f"standard must be a share in (0, 1], got {standard!r}")
        measured = float(measured)
        holds = bool(OPS[op](measured, threshold)) if self._judged_here(scale) else None
        item = Claim(id=id, paper=paper, claim=claim, measured=measured, op=op, threshold=float(threshold),
                     scale=scale, holds=holds, note=note, standard=float(standard))
        self.claims.append(item)
        return item

    def verdict(self, c: Claim) -> str:
        """This run's verdict in words, with the claim's reference rate when it does not hold."""
        from .reference import rate_text

        if c.holds is None:
            if self.stand_ins:
                return "stand-in: not judged"
            if self.cfg.profile == "smoke" or c.scale == "cpu":
                return "not judged"
            return "checked at gpu scale only" if c.scale == "gpu" else "checked at scale (and gpu) only"
        if c.holds:
            return "holds"
        rate = rate_text(self.reference.get(c.id))
        return "does not hold in this run" + (f" (held in {rate} reference runs)" if rate != "—" else "")

    def table(self) -> pd.DataFrame:
        from .reference import rate_text

        rows = [{"paper": c.paper, "claim": c.claim, "measured": round(c.measured, 4),
                 "threshold": f"{c.op} {c.threshold:g}", "verdict": self.verdict(c),
                 "reference runs": rate_text(self.reference.get(c.id)) +
                 (f" (stated as a rate: ≥ {c.standard:.0%})" if c.standard < 0.9 else "")} for c in self.claims]
        return pd.DataFrame(rows)

    def reference_figure(self):
        """Each claim's measured value in the reference runs (one dot per seed, filled where it held) against its
        threshold (dashed), with this run's value as a star: how often, and by how much, the claim holds."""
        from . import plots

        shown = [c for c in self.claims if self.reference.get(c.id)]
        if not shown:
            return None
        return plots.reference_strips(
            [{"claim": f"{c.id}", "values": self.reference[c.id]["values"], "holds": self.reference[c.id]["holds"],
              "threshold": c.threshold, "this_run": c.measured,
              "rate": self._reference_rate(c)} for c in shown],
            title=f"Reference runs (seeds {', '.join(map(str, self.reference[shown[0].id]['seeds']))}): "
                  f"measured value per seed vs threshold; ★ this run")

    def _reference_rate(self, c: Claim) -> str:
        """"9/10"; for a claim judged at a larger scale, the rate its runs here had and where it is judged now."""
        ref = self.reference[c.id]
        if not ref.get("judged"):
            return f"{c.scale} only"
        rate = f"{ref['held']}/{ref['judged']}"
        return rate if self._judged_here(c.scale) else f"{rate} at {self.cfg.profile}; judged at {c.scale}"

    def failed(self) -> list[Claim]:
        return [c for c in self.claims if c.holds is False]

    def unexpected(self) -> list[Claim]:
        """The claims that do not hold here although they held in every reference run (or have none yet)."""
        from .reference import held_in_every_run

        return [c for c in self.failed() if held_in_every_run(self.reference.get(c.id))]

    def finish(self, metrics: dict | None = None, strict: bool | None = None):
        """Write the run record; then, in strict mode, raise if a claim that held in every reference run (or has
        no reference runs yet) does not hold here. Other claims that do not hold are verdicts, not errors."""
        from . import records

        strict = self.cfg.get("strict", False) if strict is None else strict
        path = records.write_record(
            chapter=self.cfg.chapter, profile=self.cfg.profile, seed=self.cfg.seed,
            parameters={k: v for k, v in self.cfg.to_dict().items() if not k.startswith("_")},
            metrics=metrics or {},
            claims=[c.as_dict() for c in self.claims], started_at=self.started_at,
            code=self.cfg.get("_code"),
        )
        failed = self.unexpected()
        if strict and failed:
            lines = "\n".join(f"  - [{c.id}] {c.claim}: measured {c.measured:.4g}, needs {c.op} {c.threshold:g}"
                              for c in failed)
            raise ClaimFailed(f"{len(failed)} claim(s) did not hold (record: {path}):\n{lines}")
        return path
