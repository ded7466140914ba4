"""FID-infinity (distill.eval.fid.fid_infinity): the 1/N extrapolation reaches the exact Frechet distance of two
Gaussians, known in closed form, from one set of samples whose small-N FID is clearly biased above it."""

import pytest
import torch

from distill.eval.fid import default_sample_counts, feature_statistics, fid_infinity, frechet_distance

D = 8


def _gaussians():
    """Reference N(0, I) and generator N(mu_g, Sigma_g) in D dimensions, and their exact Frechet distance."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    mu_g, cov_g = torch.full((D,), 0.05, dtype=torch.float64), torch.diag(torch.linspace(0.5, 2.0, D, dtype=torch.float64)) + 0.05 * a @ a.T
    mu_r, cov_r = torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)
    return mu_g, cov_g, mu_r, cov_r, frechet_distance(mu_g, cov_g, mu_r, cov_r)


def test_fid_infinity_extrapolates_to_the_exact_gaussian_distance():
    mu_g, cov_g, mu_r, cov_r, exact = _gaussians()
    g = torch.Generator().manual_seed(10)
    gen = mu_g + torch.randn(10_000, D, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov_g).T
    counts = [100, 200, 500, 1000, 2000, 5000]
    result = fid_infinity(gen, (mu_r, cov_r), counts, draws=5, seed=0)
    assert [k for k, _ in result.points] == counts
    assert 0 < result.stderr < 0.1 and result.slope > 0  # FID falls towards its limit as N grows
    assert abs(result.fid_inf - exact) <= 3 * result.stderr + 0.05  # the limit, within the fit's error and the set's noise
    fid_100 = result.points[0][1]
    assert fid_100 - exact > 0.2 and fid_100 - exact > 5 * result.stderr  # small-N FID: clearly biased upward
    # the reference as features gives their statistics, the same result
    ref = mu_r + torch.randn(4000, D, generator=g, dtype=torch.float64)
    from_stats = fid_infinity(gen, feature_statistics(ref), counts, seed=0)
    assert fid_infinity(gen, ref, counts, seed=0).fid_inf == pytest.approx(from_stats.fid_inf)


def test_default_sample_counts_are_capped_at_the_features():
    assert default_sample_counts(10_000) == [500, 1000, 2000, 5000]
    assert default_sample_counts(2000) == [500, 1000, 2000]
    assert default_sample_counts(800) == [200, 400, 800]  # fewer than 3 capped counts: quarter, half and all


@pytest.mark.parametrize("counts", [[], [50, 100, 301], [1, 10, 100], [100, 100, 200]])
def test_bad_sample_counts_name_the_allowed_values(counts):
    gen = torch.randn(300, D, dtype=torch.float64)
    ref = (torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^FID-infinity needs at least 3 distinct sample counts from 2 to 300 \(the generated "
                       r"features\), got \[.*\]$"):
        fid_infinity(gen, ref, counts)
    with pytest.raises(ValueError, match="need at least 1 draw per sample count, got 0"):
        fid_infinity(gen, ref, [50, 100, 200], draws=0)
