"""Spectra, cosine accumulation and inter-head R^2 on synthetic data with known answers."""

from __future__ import annotations

import pytest
import torch

from vllm_thinkv.analyze.predict import greedy_predictability
from vllm_thinkv.analyze.spectra import energy_rank, gram_singular_values, weight_singular_values
from vllm_thinkv.analyze.stats import LayerStats


def test_energy_rank():
    assert energy_rank(torch.tensor([1.0] * 8 + [0.0] * 8), 0.99) == 8
    assert energy_rank(torch.tensor([1.0] * 8), 0.875) == 7  # exactly 7/8 of the energy
    assert energy_rank(torch.tensor([1.0] * 8), 0.9) == 8
    assert energy_rank(torch.tensor([4.0, 3.0]), 0.64) == 1  # 16 / 25
    assert energy_rank(torch.tensor([3.0, 4.0]), 0.65) == 2  # order does not matter
    assert energy_rank(torch.zeros(4), 0.9) == 0


def test_gram_singular_values_match_svd():
    x = torch.randn(500, 16, dtype=torch.float64) @ torch.randn(16, 16, dtype=torch.float64)
    expected = torch.linalg.svdvals(x) / 500**0.5
    assert torch.allclose(gram_singular_values(x.T @ x, 500), expected, rtol=1e-8)


def test_weight_singular_values_per_head_rows():
    w = torch.zeros(3 * 4, 10)
    w[4:8, :2] = torch.eye(4)[:, :2] * 5  # head 1: rank 2, singular values 5, 5
    svs = weight_singular_values(w, 3, 4)
    assert svs[0].abs().max() == 0 and svs[2].abs().max() == 0
    assert torch.allclose(svs[1], torch.tensor([5.0, 5.0, 0.0, 0.0], dtype=torch.float64))


def test_offset_cosine_of_a_rotating_vector():
    """x_t = (cos t*w, sin t*w): the cosine of tokens o apart is cos(o*w) exactly."""
    w, t = 0.3, 40
    angle = torch.arange(t, dtype=torch.float64) * w
    x = torch.stack([angle.cos(), angle.sin()], -1)[:, None, :].float()  # [T, 1 head, 2]
    stats = LayerStats(offsets=(1, 5, 39, 40))
    stats.add({"k_pre": x}, "fit")
    stats.add({"k_pre": x}, "heldout")
    cos = stats.mean_cosine("k_pre")[0]
    assert cos[:3].tolist() == pytest.approx([torch.cos(torch.tensor(o * w)).item() for o in (1, 5, 39)], abs=1e-6)
    assert torch.isnan(cos[3])  # no pairs 40 apart in a 40-token window


def _gram(x: torch.Tensor) -> torch.Tensor:
    z = torch.cat([x.reshape(x.shape[0], -1).double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    return z.T @ z


@pytest.fixture
def heads():
    """6 heads of 8 dims: 3 = 0 A + 1 B (exact), 4 = 2 + noise of equal variance (R^2 = 1/2), 5 independent."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)

    def sample(n):
        x = torch.randn(n, 6, 8, generator=g)
        x[:, 3] = x[:, 0] @ a + x[:, 1] @ b
        x[:, 4] = x[:, 2] + torch.randn(n, 8, generator=g)
        return _gram(x)

    return sample(8000), sample(8000)


def test_greedy_r2(heads):
    fit, held = heads
    preds = greedy_predictability(fit, held, num_heads=6, head_dim=8, max_refs=5)
    assert sorted(preds[3].refs[:2]) == [0, 1]
    assert preds[3].r2_heldout[1] == pytest.approx(1.0, abs=1e-9)
    assert preds[3].r2_heldout[0] < 0.9
    assert preds[4].refs[0] == 2
    assert preds[4].r2_heldout[0] == pytest.approx(0.5, abs=0.03)
    assert abs(preds[5].r2_heldout[-1]) < 0.03  # nothing explains an independent head
    assert preds[5].r2_fit[-1] >= preds[5].r2_fit[0]  # in-sample R^2 never falls when adding references


def test_references_capped_at_other_heads(heads):
    fit, held = heads
    preds = greedy_predictability(fit, held, num_heads=6, head_dim=8, max_refs=9)
    assert all(len(p.refs) == 5 and len(set(p.refs)) == 5 for p in preds)
