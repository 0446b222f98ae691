"""Chapter 7's lab: a sweep point trains on the chapter's device and precision."""
import numpy as np

from ftbook.labs import ch07_hyperparameter_transfer as lab


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
