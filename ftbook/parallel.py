"""Run independent, seeded jobs side by side in single-thread worker processes.

The book's CPU models are tiny: one torch thread barely gains from a second, so on a 2-core machine two
processes of one thread each finish a batch of runs almost twice as fast as one process of two threads.
A *job* is a zero-argument callable that pickles (``functools.partial`` of a module-level function); its
result comes back by pickle too. Every job seeds itself, so results are identical whatever ``workers`` is.
With ``workers=1`` jobs run here, in order, with no process and no pickling (the ``gpu`` profile: CUDA and
forked workers do not mix, and one big model per device is the point).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

_STATE: dict = {}


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    import torch

    torch.set_num_threads(1)
    _STATE.clear()
    os.environ["FTBOOK_PROGRESS"] = "0"  # a worker's bars would go to the kernel's terminal, not the notebook
    from .env import quiet_libraries

    quiet_libraries()  # nor transformers' "Loading weights" bar on every model a job loads (it lands in the book)
    if initializer is not None:
        initializer(*initargs)


def worker_state() -> dict:
    """What an ``initializer`` stored for the jobs of this process (data sent once per worker, not per job)."""
    return _STATE


class Pool:
    """Worker processes kept across batches of jobs — and across notebook cells: spawned once, fed jobs as their
    inputs become ready (``submit``), or a batch at a time (``map``). Use it as a context manager or ``close()`` it.

    With ``workers == 1`` no process is started: ``submit`` runs the job at once and returns a finished future.
    ``initializer(*initargs)`` runs once in each worker (or once here), e.g. to store data every job reads
    (:func:`worker_state`) instead of sending it with each job.
    """

    def __init__(self, workers: int = 1, *, initializer: Callable | None = None, initargs: tuple = ()):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
        self.workers, self._executor, self._submitted = workers, None, []
        if workers > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_start_worker, initargs=(initializer, initargs))
        elif initializer is not None:
            initializer(*initargs)

    def submit(self, job: Callable[[], Any]):
        """Start ``job`` (a worker takes it when free; jobs start in the order submitted); returns a
        ``concurrent.futures.Future`` — ``.result()`` waits for it and re-raises the job's error."""
        if self._executor is not None:
            future = self._executor.submit(job)
            self._submitted.append(future)
            return future
        from concurrent.futures import Future

        future: Future = Future()
        try:
            future.set_result(job())
        except BaseException as error:  # noqa: BLE001 - handed to the caller by .result(), as a worker's would be
            future.set_exception(error)
        return future

    def map(self, jobs, *, cost=None, progress: bool = True, desc: str = "runs"):
        """Run a batch and wait for it: ``jobs`` is a list (results come back as a list, in order) or a dict
        of named jobs (a dict, same keys). ``cost`` (same shape; any unit, e.g. steps) starts the biggest
        first, so that the workers end on small ones and finish together."""
        from concurrent.futures import as_completed

        from tqdm.auto import tqdm

        from .train import progress_enabled

        names = list(jobs) if isinstance(jobs, dict) else list(range(len(jobs)))
        if cost is not None and len(cost) != len(names):
            raise ValueError(f"cost has {len(cost)} entries for {len(names)} jobs")
        order = list(names)
        if cost is not None:
            order.sort(key=lambda n: -cost[n])
        bar = tqdm(total=len(names), desc=desc, disable=not progress or not progress_enabled())
        try:
            futures = {}
            for n in order:
                futures[self.submit(jobs[n])] = n
                if self._executor is None:
                    bar.update()
            results = {}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if self._executor is not None:
                    bar.update()
        finally:
            bar.close()
        return {n: results[n] for n in names} if isinstance(jobs, dict) else [results[n] for n in names]

    def close(self) -> None:
        """Stop the workers (after the jobs already submitted) and forget the initializer's state."""
        if self._executor is not None:
            from concurrent.futures import wait

            from .records import remember_workers_peak_rss

            wait(self._submitted)           # the workers' memory is read when their jobs are done, before they exit
            remember_workers_peak_rss()
            self._executor.shutdown(wait=True, cancel_futures=False)
            self._executor, self._submitted = None, []
        _STATE.clear()

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_jobs(jobs: Sequence[Callable[[], Any]], *, workers: int = 1, cost: Sequence[float] | None = None,
             initializer: Callable | None = None, initargs: tuple = (), progress: bool = True,
             desc: str = "runs") -> list:
    """Run every job in a :class:`Pool` of ``workers`` and return their results in the order of ``jobs``."""
    jobs = list(jobs)
    with Pool(min(workers, max(1, len(jobs))) if isinstance(workers, int) and not isinstance(workers, bool)
              else workers, initializer=initializer, initargs=initargs) as pool:
        return pool.map(jobs, cost=cost, progress=progress, desc=desc)
