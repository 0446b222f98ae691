"""Chapter 07_hyperparameter_transfer's knobs: defaults at ``cpu``, profile diffs, validators and rules."""
from __future__ import annotations

from ..config import ChapterSpec, ConfigError, did_you_mean
from ._checks import at_least, check_positive, grid


def _check_widths(value: list) -> None:
    grid(8, 1 << 20, "widths")(value)
    if any(w % 4 for w in value):
        raise ValueError(f"every width must be a multiple of 4, got {value!r}")


def _check_corpus(value: str) -> None:
    from ..corpora import NAMES  # here, not at the top: resolving a config does not import the corpora

    if value != "world" and value not in NAMES and not value.startswith("hf:"):
        raise ValueError(f"unknown corpus {value!r}{did_you_mean(value, ('world', *NAMES))} "
                         f"(known: world, {', '.join(NAMES)}, or hf:org/name@config)")


def _instability_width_is_swept(values) -> None:
    if values["instability_width"] not in values["widths"]:
        raise ConfigError("instability_width", f"must be one of the swept widths {values['widths']}, "
                                               f"got {values['instability_width']}")


SPEC = ChapterSpec(
    name="07_hyperparameter_transfer",
    title="Hyper-parameter transfer across width: muP, sharpness and instability proxies",
    defaults=dict(
        widths=[32, 64, 128, 256],   # model widths swept (the first is muP's base width, where muP == SP)
        lr_min=4e-3,              # smallest learning rate of the grid; the grid doubles at each of grid_points
        grid_points=7,            # learning rates per width (4e-3 ... 2.56e-1)
        steps=100,                # training steps of every sweep run
        batch_size=16,            # sequences per step
        seq_len=32,               # tokens per sequence
        warmup_steps=10,          # linear warmup, then cosine to 10 %
        n_layer=2,
        n_head=4,
        vocab_size=512,           # BPE vocabulary trained on the corpus (vocab dominates cost at this size)
        corpus="world",           # "world" (the book's synthetic corpus), an ftbook.corpora name, or hf:org/name@config
        train_docs=6000,          # documents of the corpus used
        sharpness_every=25,       # steps between Hessian eigenvalue measurements
        instability_width=128,    # width of the qk-LayerNorm comparison
        instability_lr=0.064,     # high learning rate at which the instability claim is judged (nearest grid point)
        z_loss=1e-4,              # weight of the z-loss arm (Wortsman et al. use 1e-4)
        workers=2,                # training processes (one torch thread each)
    ),
    diffs={
        "smoke": dict(widths=[32, 64], lr_min=0.016, grid_points=3, steps=6, warmup_steps=2, train_docs=400,
                      vocab_size=384, sharpness_every=3, instability_width=32,
                      instability_lr=0.064,
                      # cpu values: kept for the scale and gpu code paths at smoke sizes
                      batch_size=16, seq_len=32, n_layer=2, n_head=4),
        "gpu": dict(widths=[128, 256, 512, 1024], lr_min=1e-3, grid_points=8, steps=1000, batch_size=64, seq_len=128,
                    n_layer=4, n_head=8, vocab_size=4096, corpus="hf:Salesforce/wikitext@wikitext-103-raw-v1",
                    train_docs=200000, sharpness_every=100, instability_width=512,
                    instability_lr=0.032, workers=1),
        # the book's world corpus, wider models and longer runs, on the device
        "scale": dict(widths=[64, 128, 256, 512], lr_min=2e-3, grid_points=7, steps=300, batch_size=32, seq_len=128,
                      n_head=4, vocab_size=4096, train_docs=100_000, sharpness_every=100,
                      instability_width=256, instability_lr=0.064, workers=1),
    },
    validators={"widths": _check_widths, "corpus": _check_corpus, "grid_points": at_least(3),
                "workers": at_least(1), "train_docs": at_least(50), "sharpness_every": at_least(1),
                "instability_width": at_least(8), "z_loss": check_positive},
    rules=(_instability_width_is_swept,),
)
