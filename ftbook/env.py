"""Chapter setup: resolve the configuration, seed everything, pin threads, say what runs where."""
from __future__ import annotations

import os
import random
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import specs
from .config import Config, ConfigError

# Names IPython puts in a notebook's namespace that are not chapter parameters.
_IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}
_PARAMETER_TYPES = (int, float, str, bool, list, dict, type(None))  # lists and dicts: papermill passes YAML


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(requested: str) -> str:
    import torch

    if requested != "auto":
        if requested == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device", "'cuda' was asked for but no CUDA device is visible")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def notebook_parameters(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters a notebook holds: the plain values defined before setup runs.

    A chapter calls ``ftbook.setup(CHAPTER, globals())`` right after its ``parameters`` cell, so this
    sees exactly the parameters cell plus what papermill injected — a misspelt ``-p n_layr 4`` is
    caught by validation instead of being silently ignored.
    """
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and k not in _IPYTHON_NAMES and isinstance(v, _PARAMETER_TYPES)}


def quiet_libraries() -> None:
    """Silence the per-file progress bars and advice that transformers/datasets print on every load."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import datasets
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.disable_progress_bars()
    except ImportError:
        pass


def setup(chapter: str, namespace: Mapping[str, Any] | None = None, *, quiet: bool = False,
          **knobs) -> Config:
    """Everything a chapter does first: validate parameters, seed, threads, device, plot look.

    ``namespace`` (a notebook's ``globals()``) supplies the parameters; ``knobs`` add to them.
    Raises :class:`ftbook.config.ConfigError` naming the parameter before any work when one is wrong.
    """
    import torch

    started = time.time()
    params = {**notebook_parameters(namespace or {}), **knobs}
    profile = params.pop("profile", "cpu")
    seed = params.pop("seed", 0)
    cfg = specs.make(chapter, profile=profile, seed=seed, **params)
    device = resolve_device(cfg.device)
    # For this kernel and the worker processes it starts (environment variables: workers inherit them): stand-ins on
    # or off (ftbook.standins), and where the zoo pre-trains — where the chapter trains: the CPU in fp32 at smoke
    # and cpu, the GPU at scale and gpu (ftbook.zoo.use_device).
    os.environ["FTBOOK_STAND_INS"] = "1" if cfg.get("stand_ins") else "0"
    os.environ["FTBOOK_ZOO_DEVICE"], os.environ["FTBOOK_ZOO_PRECISION"] = device, cfg.precision
    if cfg.threads:
        # One thread per process is fastest for these tiny models on 2 cores (run chapters side by side).
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    quiet_libraries()
    from .run import code_digest

    cfg = cfg.replace(device=device, _started_at=started, _code=code_digest(cfg.chapter))
    from . import plots

    plots.configure()
    if not quiet:
        from .records import git_sha, versions

        v = versions()
        path = (f" · {cfg.code_path} code path" if cfg.get("code_path") else "") + \
            (" · STAND-INS for hub models and data" if cfg.get("stand_ins") else "")
        print(f"ftbook {v.get('ftbook', '?')} · chapter {cfg.chapter} · profile {cfg.profile}{path} · "
              f"seed {cfg.seed} · "
              f"device {device} · threads {torch.get_num_threads()} · torch {v.get('torch')} · "
              f"transformers {v.get('transformers')} · git {git_sha() or 'n/a'}")
    return cfg


def show_source(obj):
    """The source of a function or class of the book's package, for a chapter to show the code beside the maths
    (as d2l and labml do): a syntax-highlighted block in the notebook and the rendered book."""
    import inspect

    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")
