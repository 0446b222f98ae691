import numpy as np
import pytest
import torch

from ftbook import modeling
from ftbook.methods import peft as P
from ftbook.methods import weightspace as W


def test_effective_rank_counts_singular_values_holding_the_energy():
    # singular values 3, 1 (energies 9, 1): 90 % is held by the first alone, 100 % needs both
    m = np.diag([3.0, 1.0, 0.0])
    assert W.effective_rank(m, 0.9) == 1
    assert W.effective_rank(m, 0.95) == 2
    assert W.effective_rank(m, 1.0) == 2
    # four equal singular values: 90 % needs all four (3 hold only 75 %)
    assert W.effective_rank(np.diag([1.0, 1, 1, 1, 0, 0]), 0.9) == 4
    assert W.effective_rank(np.zeros((4, 3))) == 0


def test_effective_rank_ignores_rotations_and_never_exceeds_the_true_rank():
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(32, 32, generator=g))
    q2, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    spectrum = torch.zeros(32, 16)
    spectrum[range(3), range(3)] = torch.tensor([3.0, 0.5, 0.1])
    rotated = q1 @ spectrum @ q2.T  # singular values 3, 0.5, 0.1 in random bases
    assert W.effective_rank(rotated, 0.9) == 1 and W.effective_rank(rotated, 0.999) == 3
    low_rank = torch.randn(32, 4, generator=g) @ torch.randn(4, 16, generator=g)
    assert W.effective_rank(low_rank, 0.9) <= 4 and W.effective_rank(low_rank, 1.0) == 4
    with pytest.raises(ValueError, match="energy"):
        W.effective_rank(low_rank, 0.0)


def _pretrained():
    # a tall matrix whose column space is e0..e3 (left singular vectors e0..e3)
    w = np.zeros((8, 4))
    w[range(4), range(4)] = [4.0, 3.0, 2.0, 1.0]
    return w


def test_a_new_direction_outside_the_pretrained_singular_vectors_is_one_intruder():
    w0 = _pretrained()
    w1 = w0.copy()
    w1[6] += 10 * np.array([0.5, 0.5, 0.5, 0.5])  # a strong output direction e6 the base never used
    assert W.intruder_dimensions(w0, w1, top_k=4, threshold=0.5) == 1
    assert W.intruder_dimensions(w0, w1, top_k=4, threshold=0.5, side="right") == 0  # inputs: nothing new


def test_rescaling_or_a_small_nudge_adds_no_intruders():
    w0 = _pretrained()
    assert W.intruder_dimensions(w0, 3 * w0, top_k=4, threshold=0.5) == 0
    nudged = w0 + 0.05 * np.random.default_rng(0).standard_normal(w0.shape)
    assert W.intruder_dimensions(w0, nudged, top_k=4, threshold=0.5) == 0


def test_intruder_threshold_is_on_the_best_cosine():
    w0 = np.diag([2.0, 1.0])
    c, s = np.cos(np.pi / 4), np.sin(np.pi / 4)
    rotated = np.array([[c, -s], [s, c]]) @ w0  # singular vectors at 45 degrees: best cosine 0.707
    assert W.intruder_dimensions(w0, rotated, top_k=2, threshold=0.7) == 0
    assert W.intruder_dimensions(w0, rotated, top_k=2, threshold=0.75) == 2
    assert W.intruder_dimensions(w0, rotated, top_k=1, threshold=0.75) == 1  # only the top-k count
    with pytest.raises(ValueError, match="shapes"):
        W.intruder_dimensions(w0, np.zeros((3, 2)))


@pytest.fixture(scope="module")
def tiny():
    return modeling.from_config(modeling.tiny_config("llama", vocab_size=40, n_layer=1, d_model=32), seed=0)


def test_lora_wraps_a_copy_and_its_merged_update_has_at_most_rank_r(tiny):
    before = W.adapted_weights(tiny)
    assert set(k.split(".")[-1] for k in before) == set(P.LORA_TARGETS)
    lora = P.with_lora(tiny, rank=2, seed=0)
    assert W.adapted_weights(tiny).keys() == before.keys()  # the original is not wrapped
    fresh = W.adapted_weights(lora)
    assert fresh.keys() == before.keys()
    assert all(torch.equal(fresh[k], before[k]) for k in before)  # B = 0 at init: no update yet
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()
    report = W.update_report(before, W.adapted_weights(lora), energy=1.0)
    assert (report.effective_rank <= 2).all() and (report.effective_rank == 2).all()
    assert all(p.requires_grad == ("lora_" in n) for n, p in lora.named_parameters())
    with pytest.raises(ValueError, match="rank"):
        P.with_lora(tiny, rank=0)


def test_lora_init_is_seeded(tiny):
    a = dict(P.with_lora(tiny, rank=2, seed=1).named_parameters())
    b = dict(P.with_lora(tiny, rank=2, seed=1).named_parameters())
    assert all(torch.equal(a[k], b[k]) for k in a if "lora_A" in k)


def test_update_report_of_a_full_update(tiny):
    before = W.adapted_weights(tiny)
    after = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in before.items()}
    report = W.update_report(before, after)
    assert len(report) == len(before)
    assert (report.effective_rank > 2).all()  # a random update spreads its energy over many directions
    with pytest.raises(ValueError, match="differ"):
        W.update_report(before, {k: v for k, v in list(after.items())[1:]})


def test_the_base_spectrum_is_computed_once_and_gives_the_same_report():
    """Chapter 6 recomputed every base matrix's SVD (float64, CPU) for every run: at Qwen's 168 matrices of up to
    4864 x 896 that was most of the chapter. base_spectra computes them once; the report is identical."""
    g = torch.Generator().manual_seed(0)
    base = {f"m{i}": torch.randn(24, 16, generator=g) for i in range(3)}
    tuned = {k: v + 0.3 * torch.randn(24, 2, generator=g) @ torch.randn(2, 16, generator=g) for k, v in base.items()}
    plain = W.update_report(base, tuned, top_k=4)
    cached = W.update_report(base, tuned, top_k=4, base_svd=W.base_spectra(base))
    assert plain.equals(cached)
    on_device = W.update_report(base, tuned, top_k=4, base_svd=W.base_spectra(base, device="cpu"), device="cpu")
    assert list(on_device.effective_rank) == list(plain.effective_rank)     # float32 where a GPU computes
    assert list(on_device.intruders) == list(plain.intruders)
