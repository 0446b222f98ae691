"""How fast does the book train on a CPU? ``python -m ftbook.bench`` prints two small tables.

1. :func:`compare_with_trainer` — the same tiny Llama-style model on the same packed data, trained by
   :func:`ftbook.train.train` and by ``transformers.Trainer`` (same lr, schedule, batch, optimizer,
   clipping; no eval, no logging, no checkpoints), the arms interleaved in one process. Reports
   tokens/s end to end (setup included) and at steady state (first steps excluded), the ratio, peak
   RSS of each arm, and whether repeated runs gave bit-identical losses. fp32 is the like-for-like
   comparison; bf16 autocast arms show what AMX/AVX512-BF16 hardware gives at this size.
2. :func:`threads_vs_processes` — on a machine with C cores: one training process with C threads, C
   independent training processes with one thread each (side by side, e.g. C seeds at once), and one
   data-parallel run over C processes (DDP, gloo). Total tokens/s of each.

Timings on shared machines are noisy: arms are interleaved and repeated, and the median is reported.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class BenchSetup:
    n_layer: int = 2
    d_model: int = 128
    vocab_size: int = 1024
    seq_len: int = 64
    batch_size: int = 16
    lr: float = 1e-3
    warmup_steps: int = 10
    n_docs: int = 3000
    seed: int = 0


def bench_data(setup: BenchSetup = BenchSetup()):
    """(train blocks, eval blocks, tokenizer) from the synthetic world (the tokenizer is cached)."""
    from . import data as D

    world = D.World(seed=setup.seed)
    docs = D.world_documents(world, setup.n_docs, seed=setup.seed)
    train_docs, val_docs = D.split_texts(docs, 0.05, setup.seed)
    tokenizer = D.train_tokenizer(train_docs, vocab_size=setup.vocab_size)
    return (D.pack(train_docs, tokenizer, setup.seq_len), D.pack(val_docs, tokenizer, setup.seq_len, max_blocks=64),
            tokenizer)


def bench_model(setup: BenchSetup, vocab_size: int):
    from .modeling import from_config, tiny_config

    config = tiny_config("llama", vocab_size=vocab_size, n_layer=setup.n_layer, d_model=setup.d_model)
    return from_config(config, seed=setup.seed)


# --- memory ------------------------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs``); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak resident memory of this process (since the last reset where supported), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- the two arms ----------------------------------------------------------------------------------------
class _Clock:
    """Wall time and this process's CPU time. With one thread, tokens per CPU-second hardly move when
    other jobs share the cores (wall-clock tokens/s do), so the comparison is made on both."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self, tokens: int) -> dict:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return {"seconds": wall, "cpu_seconds": cpu, "tokens_per_s": tokens / wall, "cpu_tokens_per_s": tokens / cpu}


def _steady(stamps: list[float], tokens_per_step: int, skip: int) -> float:
    """Tokens per (CPU) second between the end of step ``skip`` and the end of the last step."""
    skip = min(skip, len(stamps) - 2)
    return (len(stamps) - 1 - skip) * tokens_per_step / (stamps[-1] - stamps[skip])


def run_ftbook(setup: BenchSetup, train_ds, eval_ds, vocab_size: int, steps: int, precision: str = "fp32",
               skip: int = 10) -> dict:
    from .train import TrainConfig, evaluate_loss, train

    model = bench_model(setup, vocab_size)
    cfg = TrainConfig(steps=steps, lr=setup.lr, batch_size=setup.batch_size,
                      warmup_steps=min(steps, setup.warmup_steps), precision=precision, progress=False, seed=setup.seed)
    stamps: list[float] = []
    _reset_peak_rss()
    clock = _Clock()
    history = train(model, train_ds, cfg, on_step=lambda step, m: stamps.append(time.process_time()))
    return {**clock.stop(steps * setup.batch_size * setup.seq_len),
            "steady_cpu_tokens_per_s": _steady(stamps, setup.batch_size * setup.seq_len, skip),
            "peak_rss_mib": peak_rss_mib(), "train_loss": float(history["train_loss"].iloc[-1]),
            "eval_loss": evaluate_loss(model, eval_ds)}


def run_trainer(setup: BenchSetup, train_ds, eval_ds, vocab_size: int, steps: int, precision: str = "fp32",
                skip: int = 10) -> dict:
    """``transformers.Trainer`` with sensible CPU arguments: its default (fused) AdamW, the same decay
    groups, a cosine schedule to 10 % of the peak, clipping at 1.0, no eval / logging / saving / workers."""
    import datasets
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator
    from transformers.trainer_callback import PrinterCallback

    from .train import evaluate_loss

    transformers.logging.set_verbosity_error()
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.process_time())

    ids = train_ds.with_format("numpy")[:]["input_ids"]
    labelled = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids}).with_format("numpy")
    model = bench_model(setup, vocab_size)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=setup.batch_size,
            learning_rate=setup.lr, lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": 0.1}, warmup_steps=min(steps, setup.warmup_steps), weight_decay=0.1,
            adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, bf16=precision == "bf16", use_cpu=True,
            logging_strategy="no", save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
            dataloader_num_workers=0, dataloader_pin_memory=False, seed=setup.seed)
        _reset_peak_rss()
        clock = _Clock()
        trainer = Trainer(model=model, args=args, train_dataset=labelled, data_collator=default_data_collator,
                          callbacks=[Stamp()])
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics dict
        result = trainer.train()
        timing = clock.stop(steps * setup.batch_size * setup.seq_len)
    return {**timing, "steady_cpu_tokens_per_s": _steady(stamps, setup.batch_size * setup.seq_len, skip),
            "peak_rss_mib": peak_rss_mib(), "train_loss": float(result.training_loss),
            "eval_loss": evaluate_loss(model, eval_ds)}


def run_bare(setup: BenchSetup, train_ds, eval_ds, vocab_size: int, steps: int, precision: str = "fp32",
             skip: int = 10) -> dict:
    """The least any training loop can do: forward, backward, clip, AdamW step, nothing else (fp32 only).

    Not a usable loop (no schedule, no shuffling, no logging): it is the ceiling that tells how much
    faster than ``transformers.Trainer`` *any* loop could be on this model."""
    from .train import evaluate_loss

    if precision != "fp32":
        raise ValueError("the bare loop is fp32 only")
    ids = torch.as_tensor(np.asarray(train_ds.with_format("numpy")[:]["input_ids"]))
    model = bench_model(setup, vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup.lr, betas=(0.9, 0.95), weight_decay=0.1)
    stamps: list[float] = []
    _reset_peak_rss()
    clock = _Clock()
    model.train()
    for step in range(steps):
        start = step * setup.batch_size % max(1, len(ids) - setup.batch_size)
        batch = ids[start:start + setup.batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.process_time())
    timing = clock.stop(steps * setup.batch_size * setup.seq_len)
    return {**timing, "steady_cpu_tokens_per_s": _steady(stamps, setup.batch_size * setup.seq_len, skip),
            "peak_rss_mib": peak_rss_mib(), "train_loss": float(loss.detach()),
            "eval_loss": evaluate_loss(model, eval_ds)}


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


METRICS = ("tokens_per_s", "cpu_tokens_per_s", "steady_cpu_tokens_per_s")


def _paired(runs: dict[str, list[dict]], a: str, b: str, metric: str) -> float | None:
    """Median over rounds of arm ``a`` / arm ``b`` (pairs taken in the same round, under the same load)."""
    if a not in runs or b not in runs:
        return None
    return statistics.median(x[metric] / y[metric] for x, y in zip(runs[a], runs[b]))


def compare_with_trainer(steps: int = 150, threads: int = 1, rounds: int = 3,
                         arms: tuple[str, ...] = ("trainer/fp32", "ftbook/fp32", "ftbook/bf16", "trainer/bf16"),
                         setup: BenchSetup = BenchSetup(), verbose: bool = False) -> dict:
    """ftbook's loop vs ``transformers.Trainer`` on the same model and data, interleaved in one process.

    Each arm runs ``rounds`` times (the order rotating each round) after an untimed warm-up. Reported per
    arm: medians of wall-clock tokens/s and of tokens per CPU-second (end to end, setup included; and
    ``steady``, from step 10 on), peak RSS, final losses and whether every round gave bit-identical
    losses. ``ratio`` (ftbook/fp32 over trainer/fp32) and ``bf16_speedup`` (ftbook bf16 over fp32) are
    medians of per-round ratios, by each metric; with ``threads=1`` the CPU-time ratio is the one that
    other jobs on the machine disturb least.
    """
    runners = {"ftbook": run_ftbook, "trainer": run_trainer, "bare": run_bare}
    train_ds, eval_ds, tokenizer = bench_data(setup)
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    load_before = os.getloadavg()[0]
    with _threads(threads):
        for arm in arms:  # warm-up: lazy imports, kernel selection, allocator
            loop, precision = arm.split("/")
            runners[loop](setup, train_ds, eval_ds, len(tokenizer), steps=3, precision=precision, skip=0)
        for r in range(rounds):
            for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
                loop, precision = arm.split("/")
                result = runners[loop](setup, train_ds, eval_ds, len(tokenizer), steps=steps, precision=precision)
                runs[arm].append(result)
                if verbose:
                    print(f"  round {r} {arm:13s} {result['tokens_per_s']:7.0f} tok/s wall, "
                          f"{result['cpu_tokens_per_s']:7.0f} per CPU-s "
                          f"(steady {result['steady_cpu_tokens_per_s']:.0f})",
                          file=sys.stderr, flush=True)
    summary = {}
    for arm, results in runs.items():
        summary[arm] = {k: statistics.median(x[k] for x in results) for k in (*METRICS, "seconds", "peak_rss_mib")}
        summary[arm].update(train_loss=results[0]["train_loss"], eval_loss=results[0]["eval_loss"],
                            deterministic=len({(x["train_loss"], x["eval_loss"]) for x in results}) == 1,
                            all_tokens_per_s=[round(x["tokens_per_s"]) for x in results],
                            all_cpu_tokens_per_s=[round(x["cpu_tokens_per_s"]) for x in results])
    out = {"steps": steps, "threads": threads, "rounds": rounds, "setup": setup.__dict__, "arms": summary,
           "tokens_per_step": setup.batch_size * setup.seq_len,
           "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    for name, (a, b) in {"ratio": ("ftbook/fp32", "trainer/fp32"), "ceiling": ("bare/fp32", "trainer/fp32"),
                         "bf16_speedup": ("ftbook/bf16", "ftbook/fp32"),
                         "bf16_ratio": ("ftbook/bf16", "trainer/bf16")}.items():
        if a in runs and b in runs:
            out[name] = {m: _paired(runs, a, b, m) for m in METRICS}
    return out


# --- threads vs processes -----------------------------------------------------------------------------
def _worker(args: argparse.Namespace) -> None:
    """One training process of :func:`threads_vs_processes` (``python -m ftbook.bench _worker ...``)."""
    torch.set_num_threads(args.threads)
    from .train import TrainConfig, train

    setup = BenchSetup()
    train_ds, _, tokenizer = bench_data(setup)
    model = bench_model(setup, len(tokenizer))
    cfg = TrainConfig(steps=args.steps, lr=setup.lr, batch_size=setup.batch_size,
                      warmup_steps=setup.warmup_steps, progress=False, seed=args.seed)
    if args.ready:  # side by side: start together
        Path(args.ready).touch()
        while not Path(args.go).exists():
            time.sleep(0.005)
    began = time.perf_counter()
    history = train(model, train_ds, cfg)
    seconds = time.perf_counter() - began
    if int(os.environ.get("RANK", "0")) == 0:
        tokens = args.steps * history.attrs["tokens_per_step"]
        Path(args.out).write_text(json.dumps({"seconds": seconds, "tokens": tokens, "threads": args.threads,
                                              "processes": history.attrs["processes"],
                                              "train_loss": float(history["train_loss"].iloc[-1])}))


def _worker_cmd(steps: int, threads: int, out: Path, seed: int = 0, ready: Path | None = None,
                go: Path | None = None) -> list[str]:
    cmd = ["-m", "ftbook.bench", "_worker", "--steps", str(steps), "--threads", str(threads), "--out", str(out),
           "--seed", str(seed)]
    if ready:
        cmd += ["--ready", str(ready), "--go", str(go)]
    return cmd


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false"}


def _side_by_side(n: int, steps: int, folder: Path) -> dict:
    procs, outs = [], []
    go = folder / "go"
    go.unlink(missing_ok=True)
    for i in range(n):
        out, ready = folder / f"side-{i}.json", folder / f"ready-{i}"
        ready.unlink(missing_ok=True)
        outs.append(out)
        procs.append(subprocess.Popen([sys.executable, *_worker_cmd(steps, 1, out, seed=i, ready=ready, go=go)],
                                      env=_env(1)))
    deadline = time.time() + 300
    while not all((folder / f"ready-{i}").exists() for i in range(n)):
        if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                p.kill()
            raise RuntimeError("a benchmark worker failed to start")
        time.sleep(0.01)
    go.touch()
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"a benchmark worker exited with {p.returncode}")
    results = [json.loads(o.read_text()) for o in outs]
    tokens = sum(r["tokens"] for r in results)
    return {"processes": n, "threads": 1, "tokens_per_s": tokens / max(r["seconds"] for r in results)}


def _single(threads: int, steps: int, folder: Path) -> dict:
    out = folder / f"single-{threads}.json"
    subprocess.run([sys.executable, *_worker_cmd(steps, threads, out)], env=_env(threads), check=True)
    r = json.loads(out.read_text())
    return {"processes": 1, "threads": threads, "tokens_per_s": r["tokens"] / r["seconds"]}


def _ddp(n: int, steps: int, folder: Path) -> dict:
    out = folder / "ddp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "--module", *_worker_cmd(steps, 1, out)[1:]]
    subprocess.run(cmd, env=_env(1), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    return {"processes": n, "threads": 1, "tokens_per_s": r["tokens"] / r["seconds"], "data_parallel": True}


def threads_vs_processes(steps: int = 150, cores: int | None = None, rounds: int = 2, ddp: bool = True,
                         verbose: bool = False) -> dict:
    """Total training throughput on ``cores`` cores (default: all): 1 process x ``cores`` threads, ``cores``
    independent processes x 1 thread side by side, 1 process x 1 thread, and (``ddp``) one DDP run over
    ``cores`` processes x 1 thread. Each process trains the benchmark model; times exclude start-up."""
    cores = cores or os.cpu_count() or 1
    arms = {f"1 proc x {cores} threads": lambda f: _single(cores, steps, f),
            f"{cores} procs x 1 thread (independent)": lambda f: _side_by_side(cores, steps, f),
            "1 proc x 1 thread": lambda f: _single(1, steps, f)}
    if ddp and cores > 1:
        arms[f"{cores} procs x 1 thread (DDP)"] = lambda f: _ddp(cores, steps, f)
    bench_data(BenchSetup())  # train and cache the tokenizer once, before the workers need it
    runs: dict[str, list[dict]] = {a: [] for a in arms}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        names = list(arms)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                result = arms[name](Path(tmp))
                runs[name].append(result)
                if verbose:
                    print(f"  round {r} {name:32s} {result['tokens_per_s']:8.0f} tok/s", file=sys.stderr, flush=True)
    summary = {a: {**rs[0], "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
                   "all_tokens_per_s": [round(x["tokens_per_s"]) for x in rs]} for a, rs in runs.items()}
    return {"steps": steps, "cores": cores, "rounds": rounds, "arms": summary,
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}


# --- command line ---------------------------------------------------------------------------------------
def format_tables(cmp: dict | None, tvp: dict | None) -> str:
    lines = []
    if cmp:
        lines.append(f"ftbook vs transformers.Trainer: {cmp['steps']} steps x {cmp['tokens_per_step']} tokens, "
                     f"{cmp['threads']} thread(s), median of {cmp['rounds']}, load average {cmp['load_average']}")
        lines.append(f"{'arm':13s} {'tok/s':>7s} {'tok/CPU-s':>9s} {'steady':>7s} {'peak RSS':>9s} {'eval loss':>9s}"
                     f"  deterministic")
        for arm, a in cmp["arms"].items():
            lines.append(f"{arm:13s} {a['tokens_per_s']:7.0f} {a['cpu_tokens_per_s']:9.0f} "
                         f"{a['steady_cpu_tokens_per_s']:7.0f} {a['peak_rss_mib']:7.0f}Mi {a['eval_loss']:9.4f}"
                         f"  {a['deterministic']}")
        for key, label in (("ratio", "ftbook/trainer, fp32"), ("ceiling", "bare loop/trainer"),
                           ("bf16_speedup", "ftbook bf16/fp32"),
                           ("bf16_ratio", "ftbook/trainer, bf16")):
            if key in cmp:
                r = cmp[key]
                lines.append(f"{label + ':':22s} {r['tokens_per_s']:.2f}x wall, {r['cpu_tokens_per_s']:.2f}x CPU time,"
                             f" {r['steady_cpu_tokens_per_s']:.2f}x steady")
    if tvp:
        lines.append("")
        lines.append(f"threads vs processes: {tvp['steps']} steps per process, {tvp['cores']} cores, "
                     f"median of {tvp['rounds']}, load average {tvp['load_average']}")
        for name, a in tvp["arms"].items():
            lines.append(f"{name:34s} {a['tokens_per_s']:7.0f} tok/s in all  {a['all_tokens_per_s']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:
        p = argparse.ArgumentParser(prog="ftbook.bench _worker")
        p.add_argument("--steps", type=int, required=True)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--out", required=True)
        p.add_argument("--ready")
        p.add_argument("--go")
        _worker(p.parse_args(argv[1:]))
        return 0
    p = argparse.ArgumentParser(prog="ftbook bench", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per arm (default 150)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the ftbook-vs-Trainer comparison")
    p.add_argument("--rounds", type=int, default=3, help="repetitions of each arm (median reported)")
    p.add_argument("--only", choices=("trainer", "processes"), help="run one of the two benchmarks")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 arms")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("-v", "--verbose", action="store_true", help="print each run as it finishes")
    args = p.parse_args(argv)
    cmp = tvp = None
    if args.only in (None, "trainer"):
        arms = ("trainer/fp32", "ftbook/fp32", "bare/fp32") + (() if args.no_bf16 else ("ftbook/bf16", "trainer/bf16"))
        cmp = compare_with_trainer(steps=args.steps, threads=args.threads, rounds=args.rounds, arms=arms,
                                   verbose=args.verbose)
    if args.only in (None, "processes"):
        tvp = threads_vs_processes(steps=args.steps, rounds=max(1, args.rounds - 1), verbose=args.verbose)
    print(format_tables(cmp, tvp))
    if args.json:
        Path(args.json).write_text(json.dumps({"trainer": cmp, "processes": tvp}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
