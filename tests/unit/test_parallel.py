"""ftbook.parallel: results in job order, the same with one or two worker processes, clear errors."""
from functools import partial

import pytest
import torch

from ftbook import parallel


def _seeded_draw(seed: int, n: int) -> list[float]:
    torch.manual_seed(seed)
    return torch.randn(n).tolist()


def _threads_and_progress() -> tuple[int, str | None]:
    import os

    return torch.get_num_threads(), os.environ.get("FTBOOK_PROGRESS")


def _store(value) -> None:
    parallel.worker_state()["value"] = value


def _stored_plus(x: int) -> int:
    return parallel.worker_state()["value"] + x


def test_results_come_back_in_job_order_and_match_inline_runs():
    jobs = [partial(_seeded_draw, seed, 3) for seed in (5, 1, 7, 2)]
    inline = parallel.run_jobs(jobs, workers=1, progress=False)
    # cost sends the jobs out of order; the results must still line up with the jobs
    *side_by_side, worker_a, worker_b = parallel.run_jobs(
        jobs + [_threads_and_progress] * 2, workers=2, cost=[1, 4, 2, 3, 0, 0], progress=False)
    assert side_by_side == inline
    assert inline[0] == _seeded_draw(5, 3) and inline[0] != inline[1]
    # workers run one torch thread each and draw no progress bars (they would land in the kernel's terminal)
    assert worker_a == worker_b == (1, "0")


def test_initializer_sends_data_once_per_worker_and_is_cleared_inline():
    for workers in (1, 2):
        out = parallel.run_jobs([partial(_stored_plus, i) for i in range(3)], workers=workers,
                                initializer=_store, initargs=(10,), progress=False)
        assert out == [10, 11, 12]
    assert "value" not in parallel.worker_state()  # the inline run left nothing behind


@pytest.mark.parametrize("workers", [0, -1, 1.5])
def test_bad_workers_is_one_clear_error(workers):
    with pytest.raises(ValueError, match="workers"):
        parallel.run_jobs([partial(_seeded_draw, 0, 1)], workers=workers)


def test_cost_must_match_the_jobs():
    with pytest.raises(ValueError, match="cost has 1 entries for 2 jobs"):
        parallel.run_jobs([partial(_seeded_draw, 0, 1)] * 2, workers=1, cost=[1])


def _fail() -> None:
    raise RuntimeError("job failed")


def test_pool_keeps_workers_across_batches_and_submits():
    with parallel.Pool(2) as pool:
        early = pool.submit(partial(_seeded_draw, 3, 2))  # e.g. started in one notebook cell ...
        named = pool.map({"a": partial(_seeded_draw, 1, 2), "b": partial(_seeded_draw, 2, 2)},
                         cost={"a": 1, "b": 5}, progress=False)
        assert list(named) == ["a", "b"] and named["a"] == _seeded_draw(1, 2)
        assert early.result() == _seeded_draw(3, 2)  # ... collected in a later one
        with pytest.raises(RuntimeError, match="job failed"):
            pool.submit(_fail).result()


def test_inline_pool_runs_at_submit_and_hands_errors_to_result():
    with parallel.Pool(1) as pool:
        future = pool.submit(_fail)  # no raise here: the error belongs to whoever asks for the result
        assert future.done()
        with pytest.raises(RuntimeError, match="job failed"):
            future.result()
        assert pool.map([partial(_seeded_draw, 0, 1)], progress=False) == [_seeded_draw(0, 1)]
