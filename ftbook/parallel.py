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
from typing import Any, Callable, Sequence

_STATE: dict = {}


def _start_worker(initializer: Callable | None, initargs: tuple) -> None:
    import torch

    torch.set_num_threads(1)
    _STATE.clear()
    os.environ["FTBOOK_PROGRESS"] = "0"  # a worker's bars would go to the kernel's terminal, not the notebook
    if initializer is not None:
        initializer(*initargs)


def worker_state() -> dict:
    """What an ``initializer`` stored for the jobs of this process (data sent once per worker, not per job)."""
    return _STATE


def run_jobs(jobs: Sequence[Callable[[], Any]], *, workers: int = 1, cost: Sequence[float] | None = None,
             initializer: Callable | None = None, initargs: tuple = (), progress: bool = True,
             desc: str = "runs") -> list:
    """Run every job and return their results in the order of ``jobs``.

    ``workers > 1`` starts that many spawned processes (one torch thread each). ``cost`` (any unit, e.g. steps)
    sends the biggest jobs first, so that both workers end on small ones and finish together.
    ``initializer(*initargs)`` runs once in each worker (or once here when ``workers == 1``).
    """
    from tqdm.auto import tqdm

    from .train import progress_enabled

    jobs = list(jobs)
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if cost is not None and len(cost) != len(jobs):
        raise ValueError(f"cost has {len(cost)} entries for {len(jobs)} jobs")
    order = list(range(len(jobs)))
    if cost is not None:
        order.sort(key=lambda i: -cost[i])
    results: list = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc=desc, disable=not progress or not progress_enabled())
    try:
        if workers == 1 or len(jobs) <= 1:
            if initializer is not None:
                initializer(*initargs)
            try:
                for i in order:
                    results[i] = jobs[i]()
                    bar.update()
            finally:
                _STATE.clear()  # what the initializer stored is for these jobs only
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_start_worker, initargs=(initializer, initargs)) as pool:
                futures = {pool.submit(jobs[i]): i for i in order}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
    finally:
        bar.close()
    return results
