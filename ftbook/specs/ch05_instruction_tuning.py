"""Chapter 05_instruction_tuning\'s knobs: defaults at ``cpu``, diffs for the other profiles, validators and rules."""
from __future__ import annotations

from ..config import ChapterSpec
from ._checks import at_least, check_open_unit, grid, names_from, pretrained_model

FAMILIES = ("add", "max", "min", "sort", "reverse", "first", "last", "length", "count", "parity", "successor")


def _check_families(value: list) -> None:
    names_from(FAMILIES, "task family")(value)
    if len(value) > len(FAMILIES) - 2:
        raise ValueError(f"holds out {len(value)} families; at least 2 must remain for tuning")


def _check_family_orders(value: int) -> None:
    if not 1 <= value <= len(FAMILIES) - 3:
        raise ValueError(f"must lie between 1 and {len(FAMILIES) - 3} (each order starts with a different tuning "
                         f"family; the default holds out 3 of {len(FAMILIES)}), got {value}")


def _check_instructions(value: str) -> None:
    if value != "synthetic" and not value.startswith("hf:"):
        raise ValueError(f"must be 'synthetic' (the world's task families) or a hub dataset 'hf:org/name', "
                         f"got {value!r}")


SPEC = ChapterSpec(
    name="05_instruction_tuning",
    title="Instruction tuning: chat templates, response-only loss, held-out tasks, quality vs quantity",
    defaults=dict(
        model="zoo:base",              # the pre-trained base: chapter 1's zoo model, or hf:/path:
        instructions="synthetic",      # tuning data: the world's task families, or a hub dataset (gpu)
        # never tuned on: the FLAN-style evaluation — answer types (a list, even/odd) that no tuned family uses
        held_out_families=["sort", "reverse", "parity"],
        family_counts=[1, 2, 4, 8],       # the family sweep: tuning families (nested sets, seeded order)
        family_orders=2,               # orders of the sweep averaged (each starts with another family)
        response_style="answer",       # 'answer' (the bare answer) or 'sentence' (pre-training's sentence)
        train_pairs=800,               # instruction pairs per tuning run (all arms but the LIMA ones)
        steps=100, lr=2e-3, batch_size=16, seq_len=40,
        eval_per_family=60,            # held-out-family test questions per family (half that per tuned family)
        lima_clean_pairs=160,          # the small, clean, diverse set
        lima_large_pairs=1600,         # the large narrow / noisy sets
        lima_noise=0.5,                # fraction of wrong (but well-formed) responses in the noisy set
        chat_pairs=60,                 # real question/answer pairs (chatterbot; gpu: the hub set) mixed into every run
        grad_accum=1,                  # micro-batches per step (a small GPU: more of them, the same update)
        gradient_checkpointing=False,  # recompute activations in the backward pass (a small GPU: less memory)
        workers=2,                     # processes: the arms are independent and run side by side
    ),
    diffs={
        "smoke": dict(steps=4, train_pairs=64, eval_per_family=2, lima_clean_pairs=32, lima_large_pairs=64,
                      family_counts=[1, 2], chat_pairs=8, batch_size=8, family_orders=1, workers=1),
        "gpu": dict(model="hf:Qwen/Qwen2.5-0.5B", instructions="hf:databricks/databricks-dolly-15k",
                    steps=1000, lr=2e-5, batch_size=32, seq_len=512, train_pairs=10_000, eval_per_family=200,
                    lima_clean_pairs=1000, lima_large_pairs=10_000, chat_pairs=500, workers=1),
        # the scale zoo base; the gpu-only claims still need a real pre-trained model (see the chapter)
        "scale": dict(model="zoo:scale-base", train_pairs=2000, steps=300, lr=5e-4, batch_size=32,
                      eval_per_family=100, lima_clean_pairs=400, lima_large_pairs=4000, workers=1),
    },
    choices={"response_style": ("answer", "sentence")},
    validators={"model": pretrained_model, "instructions": _check_instructions,
                "held_out_families": _check_families, "family_counts": grid(1, len(FAMILIES), "family counts"),
                "lima_noise": check_open_unit, "train_pairs": at_least(8), "eval_per_family": at_least(1),
                "lima_clean_pairs": at_least(2), "lima_large_pairs": at_least(2), "chat_pairs": at_least(0),
                "family_orders": _check_family_orders, "workers": at_least(1), "grad_accum": at_least(1)},
)
