"""The ``ftbook`` command: run chapters, build the book, report results, describe the environment.

    ftbook run 01 --profile cpu -p n_layer=4     execute a chapter (papermill), cached
    ftbook run --all --jobs 2                    every chapter, two kernels side by side
    ftbook run 04 --profile smoke --code-path gpu --stand-ins
                                                 the gpu profile's code at smoke sizes, offline (tiny stand-ins)
    ftbook book                                  execute (cached) + render the Jupyter Book
    ftbook report                                claims x runs from the run records, and the reference rates
    ftbook reference --all --jobs 2              every chapter at seeds 0-9 -> results/cpu/*.json (resumable)
    ftbook env                                   versions, hardware, caches
    ftbook data prepare [NAME]                   fetch + verify the third-party corpora
    ftbook bench                                 ftbook's loop vs transformers.Trainer
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import config as C
from . import specs


def parse_value(text: str):
    """``-p key=value`` values as papermill would read them: int, float, bool, None, else string."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_parameters(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise C.ConfigError(pair, "parameters are given as key=value, e.g. -p n_layer=4")
        key, value = pair.split("=", 1)
        key = key.strip()
        if key in ("seed", "profile"):   # the runner names caches and records by these: they have their own flags
            raise C.ConfigError(key, f"is set with --{key} {value.strip()}, not -p {key}=…")
        out[key] = parse_value(value)
    return out


def _cmd_run(args) -> int:
    from . import run

    params = parse_parameters(args.parameter)
    if args.stand_ins:
        params["stand_ins"] = True
    if args.code_path:
        params["code_path"] = args.code_path
    if args.all:
        chapters = [str(p) for p in run.all_chapters()]
    elif args.chapter:
        chapters = [args.chapter]
    else:
        raise C.ConfigError("chapter", "name a chapter (e.g. `ftbook run 01`) or pass --all")
    seeds = parse_seeds(args.seeds) if args.seeds else [args.seed]
    jobs = [(ch, s) for ch in chapters for s in seeds]
    if args.output and len(jobs) > 1:
        raise C.ConfigError("output", "--output takes one chapter and one seed")
    from concurrent.futures import ThreadPoolExecutor

    for ch, _ in jobs:  # validate every job before running any
        specs.validate(run.notebook_path(ch).stem, args.profile, params)
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(run.execute, ch, profile=args.profile, seed=s, parameters=params,
                               output=Path(args.output) if args.output else None,
                               use_cache=not args.no_cache, progress=args.progress) for ch, s in jobs]
        results = [f.result() for f in futures]
    for r in results:
        print(f"{r.chapter} seed {r.parameters['seed']}: {r.path}" + (" (cached)" if r.cached else ""))
    return 0


def _cmd_book(args) -> int:
    from . import run

    html = run.build_book(profile=args.profile, seed=args.seed, jobs=args.jobs,
                          execute_chapters=not args.no_execute)
    print(html / "index.html")
    return 0


def parse_seeds(text: str) -> list[int]:
    """``"0-9"`` or ``"0,1,2"`` (or a mix: ``"0-3,7"``) -> the seeds, in order, without repeats."""
    seeds: list[int] = []
    try:
        for part in str(text).split(","):
            if "-" in part.strip()[1:]:
                low, high = part.split("-", 1)
                seeds += range(int(low), int(high) + 1)
            elif part.strip():
                seeds.append(int(part))
    except ValueError:
        raise C.ConfigError("seeds", f"must look like '0-9' or '0,1,2', got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds):
        raise C.ConfigError("seeds", f"must name non-negative seeds, got {text!r}")
    return list(dict.fromkeys(seeds))


def _cmd_reference(args) -> int:
    from . import reference, report, run

    if args.all == bool(args.chapters):
        raise C.ConfigError("chapter", "name chapters (e.g. `ftbook reference 04 06`) or pass --all, not both")
    chapters = [str(p) for p in run.all_chapters()] if args.all else args.chapters
    C.check_profile(args.profile)
    if args.profile == "smoke":
        raise C.ConfigError("profile", "smoke runs judge no claim; reference runs are for cpu (or scale, gpu)")
    if args.from_records:
        for chapter in chapters:
            print(run.results_from_records(chapter, Path(args.from_records), seeds=parse_seeds(args.seeds),
                                           profile=args.profile))
        print(report.reference_text(args.profile))
        return 0
    out = run.reference_sweep(chapters, seeds=parse_seeds(args.seeds), profile=args.profile, jobs=args.jobs,
                              write=not args.dry_run)
    print(report.reference_text(args.profile))
    missing = [name for name, path in out.items() if path is None and not args.dry_run]
    if missing:
        print(f"ftbook: some runs failed, no results written for: {', '.join(missing)}", file=sys.stderr)
        return 1
    totals = reference.totals(args.profile)
    print(f"{totals['meeting']} of {totals['claims']} claims judged at {args.profile} hold in >= "
          f"{reference.STANDARD:.0%} of their reference runs")
    return 0


def _cmd_report(args) -> int:
    from . import report
    from .records import atomic_write_text

    directory = Path(args.records) if args.records else None
    print(report.reference_text("cpu"))
    print()
    print(report.text(directory))
    if args.markdown:
        atomic_write_text(Path(args.markdown), report.markdown(directory))
        print(f"written: {args.markdown}")
    return 0


def _cmd_env(args) -> int:
    from . import records, run

    info = {"versions": records.versions(), "hardware": records.hardware(), "git": records.git_sha(),
            "FTBOOK_HOME": str(records.ftbook_home()), "records": str(records.records_dir()),
            "execution cache": str(run.cache_dir()), "chapters": [p.name for p in run.all_chapters()],
            "profiles": list(C.PROFILES)}
    try:
        import torch

        if torch.cuda.is_available():
            from .train import peak_tflops

            name = torch.cuda.get_device_name(0)
            info["gpu"] = {"name": name, "bf16": torch.cuda.is_bf16_supported(including_emulation=False),
                           "peak_tflops_bf16": peak_tflops(name)}
    except ImportError:
        pass
    zoo_dir = records.ftbook_home() / "zoo"
    info["zoo entries"] = sorted(p.name for p in zoo_dir.iterdir() if p.is_dir()) if zoo_dir.exists() else []
    try:
        from . import corpora

        info["corpora prepared"] = {n: corpora.is_prepared(n) for n in corpora.NAMES}
    except ImportError:
        pass
    print(json.dumps(info, indent=2))
    return 0


def _cmd_data(args) -> int:
    from . import corpora

    if args.action == "prepare":
        paths = corpora.prepare(args.name)
        for name, path in paths.items():
            print(f"{name}: {path}")
    else:
        print(corpora.describe().to_string(index=False))
    return 0


def _cmd_bench(args) -> int:
    from . import bench

    return bench.main(args.rest) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftbook", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="execute chapters with papermill (cached)",
                       description="Execute a chapter notebook with papermill. The executed notebook is "
                                   "cached: re-running with the same notebook, parameters and ftbook "
                                   "source reuses it.")
    p.add_argument("chapter", nargs="?", help="chapter number, name or notebook path (e.g. 01)")
    p.add_argument("--all", action="store_true", help="every chapter in chapters/")
    p.add_argument("--profile", default="cpu", help=f"one of {', '.join(C.PROFILES)} (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", help="several seeds: 0,1,2 or 0-9")
    p.add_argument("-p", "--parameter", action="append", metavar="KEY=VALUE",
                   help="a chapter knob, e.g. -p n_layer=4 (repeatable)")
    p.add_argument("--output", help="also copy the executed notebook here")
    p.add_argument("--jobs", type=int, default=1, help="notebooks executed side by side (default 1)")
    p.add_argument("--no-cache", action="store_true", help="execute even if a cached result exists")
    p.add_argument("--progress", action="store_true", help="show papermill's per-cell progress bar")
    p.add_argument("--code-path", help="take another profile's code path (its hub models and data, device, the knobs "
                                       "it sets) at this profile's sizes, e.g. --profile smoke --code-path gpu")
    p.add_argument("--stand-ins", action="store_true",
                   help="replace every hub model and dataset by a tiny local stand-in of the same kind (offline; "
                        "no claim is judged)")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("reference", help="run chapters at the reference seeds 0-9 and write results/<profile>/",
                       description="Run each chapter at every reference seed with its default knobs, then write "
                                   "one results file per chapter (results/<profile>/<chapter>.json: every claim's "
                                   "value and verdict per seed, the code's digest, versions, hardware, wall time "
                                   "and peak memory of each run). Resumable: runs already recorded for the same "
                                   "code are reused, so a killed sweep continues and a changed chapter alone "
                                   "runs again. Commit the results of the final code.")
    p.add_argument("chapters", nargs="*", help="chapter numbers or names (e.g. 04 06)")
    p.add_argument("--all", action="store_true", help="every chapter in chapters/")
    p.add_argument("--seeds", default="0-9", help="reference seeds (default 0-9)")
    p.add_argument("--profile", default="cpu", help="cpu (default), scale or gpu")
    p.add_argument("--jobs", type=int, default=2, help="notebooks executed side by side (default 2)")
    p.add_argument("--dry-run", action="store_true", help="run (or reuse) everything but write no results file")
    p.add_argument("--from-records", metavar="DIR",
                   help="run nothing: write the results from the default-knob records in DIR, whatever code made "
                        "them (the chapter tests check that this code reproduces their seed-0 values)")
    p.set_defaults(func=_cmd_reference)

    p = sub.add_parser("book", help="execute every chapter (cached) and render the Jupyter Book")
    p.add_argument("--profile", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--no-execute", action="store_true", help="render the notebooks without executing them")
    p.set_defaults(func=_cmd_book)

    p = sub.add_parser("report", help="print every claim of every recorded run")
    p.add_argument("--records", help="records folder (default $FTBOOK_HOME/records)")
    p.add_argument("--markdown", help="also write the markdown results page here")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("env", help="versions, hardware, caches")
    p.set_defaults(func=_cmd_env)

    p = sub.add_parser("data", help="the real-text corpora: list or prepare")
    p.add_argument("action", choices=["prepare", "list"])
    p.add_argument("name", nargs="?", help="one corpus (default: all)")
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("bench", help="benchmark ftbook's training loop against transformers.Trainer")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for python -m ftbook.bench")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # every option, --help included, belongs to ftbook.bench's own parser
        return _cmd_bench(argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except C.ConfigError as exc:
        print(f"ftbook: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # one clear line, not a traceback, for the errors we raise on purpose
        from .modeling import ModelSpecError
        from .run import ChapterFailed

        if isinstance(exc, (ChapterFailed, ModelSpecError)):
            print(f"ftbook: error: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
