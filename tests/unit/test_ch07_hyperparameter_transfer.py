"""Chapter 7's lab: the sweep's runs, Wortsman et al.'s learning-rate sensitivity and z-loss, device and precision."""
import numpy as np
import pytest
import torch

from ftbook.labs import ch07_hyperparameter_transfer as lab
from ftbook.methods import mup


def test_lr_sensitivity_is_the_mean_excess_over_the_best_capped_at_initialisation():
    assert lab.lr_sensitivity([2.0, 2.0, 2.0], init_loss=6.0) == 0.0
    assert lab.lr_sensitivity([2.0, 3.0, float("inf")], init_loss=6.0) == pytest.approx((0 + 1 + 4) / 3)


def test_z_loss_adds_the_penalty_on_the_output_normaliser():
    model = mup.make_model(50, 32, "sp", seed=0, seq_len=8)
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    plain = model(input_ids=ids, labels=ids).loss
    with_z = lab.loss_with_z_loss(model, batch, weight=1e-2)
    z = torch.logsumexp(model(input_ids=ids).logits[:, :-1].float(), -1).pow(2).mean()
    assert torch.allclose(with_z, plain + 1e-2 * z, atol=1e-5) and with_z > plain


def test_a_sweep_point_trains_and_reports_its_curve_and_the_z_loss_arm_changes_it():
    import numpy as np

    rng = np.random.default_rng(0)
    train_ids, val_ids = rng.integers(0, 40, (64, 16)), rng.integers(0, 40, (8, 16))
    common = dict(steps=6, batch_size=4, warmup_steps=1, log_every=2, base_width=16, n_head=2)
    plain = lab.train_point(lab.RunSpec("sp", 16, 0.01, **common), train_ids, val_ids)
    again = lab.train_point(lab.RunSpec("sp", 16, 0.01, **common), train_ids, val_ids)
    z = lab.train_point(lab.RunSpec("sp", 16, 0.01, z_loss=0.1, **common), train_ids, val_ids)
    assert plain["val_loss"] == again["val_loss"] and np.isfinite(plain["val_loss"])   # seeded
    assert [r["step"] for r in plain["curve"]] == [2, 4, 6] and plain["curve"][0]["max_logit"] > 0
    assert z["val_loss"] != plain["val_loss"] and z["z_loss"] == 0.1
    runs, curves, _ = lab.frames([plain, z])
    assert list(runs.z_loss) == [0.0, 0.1] and lab.best_lr([plain, z], "sp", 16) == 0.01


def test_a_sweep_point_trains_in_the_precision_it_is_given(monkeypatch):
    """ch 7 at gpu trained every run in fp32 (RunSpec had no precision): bf16 now reaches the loop."""
    from ftbook import train as T

    seen = []
    original = T.train

    def record(model, data, cfg, **kwargs):
        seen.append((cfg.device, cfg.precision))
        return original(model, data, cfg, **kwargs)

    monkeypatch.setattr(T, "train", record)
    ids = np.random.default_rng(0).integers(0, 40, size=(32, 8))
    out = lab.train_point(lab.RunSpec("mup", 32, 1e-2, steps=2, batch_size=4, warmup_steps=1, precision="bf16",
                                      log_every=1), ids, ids[:8])
    assert seen == [("cpu", "bf16")] and out["precision"] == "bf16" and np.isfinite(out["val_loss"])
    assert lab.RunSpec("sp", 32, 1e-2).precision == "fp32"     # the cpu default, unchanged


def _sweep(parametrization, width, grid, losses):
    return [{"parametrization": parametrization, "width": width, "lr": lr, "val_loss": loss, "qk_norm": False,
             "z_loss": 0.0} for lr, loss in zip(grid, losses)]


def test_the_optimum_lies_between_grid_points_at_the_vertex_of_the_loss_parabola():
    grid = lab.lr_grid(1e-3, 6)
    vertex = 2.3                                     # in grid steps
    losses = [3.0 + 0.1 * (k - vertex) ** 2 for k in range(6)]
    assert lab.optimum_position(_sweep("mup", 32, grid, losses), "mup", 32, grid) == pytest.approx(vertex)
    # at the grid's edge, or beside a diverged run, the best grid point is all there is
    assert lab.optimum_position(_sweep("mup", 32, grid, [1, 2, 3, 4, 5, 6]), "mup", 32, grid) == 0.0
    assert lab.optimum_position(_sweep("mup", 32, grid, [5, 4, 3, 2, float("inf"), 6]), "mup", 32, grid) == 3.0


def test_a_near_tie_moves_the_optimum_by_a_fraction_of_a_step_and_a_moving_optimum_by_its_distance():
    grid = lab.lr_grid(1e-3, 7)
    # two widths whose best grid points differ by one step only because their neighbours nearly tie
    tie = _sweep("mup", 32, grid, [3.0 + 0.1 * (k - 2.45) ** 2 for k in range(7)])
    tie += _sweep("mup", 64, grid, [2.9 + 0.1 * (k - 2.55) ** 2 for k in range(7)])
    assert lab.optimum_shift(tie, "mup", [32, 64], grid) == pytest.approx(0.1)
    # SP's optimum moving a step per doubling of the width spans the distance it moved
    moving = [row for w, v in ((32, 4.2), (64, 3.2), (128, 2.2)) for row in
              _sweep("sp", w, grid, [3.0 + 0.1 * (k - v) ** 2 for k in range(7)])]
    assert lab.optimum_shift(moving, "sp", [32, 64, 128], grid) == pytest.approx(2.0)
