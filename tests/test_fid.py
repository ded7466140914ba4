"""The mnist16 feature extractor inside torch-fidelity: registered, working, and measuring something."""

import pytest
import torch
from safetensors.torch import save_file

from distill.data import load_dataset
from distill.eval.fid import DEFAULT_WEIGHTS, Mnist16Classifier, content_hash, fid_kid, load_classifier, uint8_images


@pytest.fixture
def weights(tmp_path):
    """The committed classifier when present, else a randomly initialised one (the FID identities hold for any
    feature map)."""
    if DEFAULT_WEIGHTS.is_file():
        return str(DEFAULT_WEIGHTS)
    torch.manual_seed(0)
    path = tmp_path / "random.safetensors"
    save_file(Mnist16Classifier().state_dict(), str(path))
    return str(path)


def test_fid_of_a_set_against_itself_is_zero_and_against_noise_is_large(weights, tmp_path):
    digits = load_dataset("mnist16", "heldout").x[:200]
    noise = torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    same = fid_kid(digits, digits, weights_path=weights, kid_subset_size=100)
    far = fid_kid(noise, digits, weights_path=weights, kid_subset_size=100, cache_root=str(tmp_path / "cache"))
    other = load_dataset("mnist16", "train").x[:200]
    near = fid_kid(other, digits, weights_path=weights, kid_subset_size=100, cache_root=str(tmp_path / "cache"))
    # scale-free checks (they hold for any feature map): identical sets give 0, noise sits far above real digits
    assert abs(same["fid"]) < 1e-9 * far["fid"] + 1e-9
    # KID is an unbiased estimate over random subsets: 0 in expectation only, with the diagonal terms it excludes
    assert abs(same["kid"]) < 0.15 * far["kid"]
    assert 0 < near["fid"] and far["fid"] > 5 * near["fid"] and far["kid"] > 5 * near["kid"]
    assert any((tmp_path / "cache").rglob(f"*{content_hash(digits)}*"))  # reference statistics cached by content


def test_uint8_conversion_matches_torch_fidelity_input_format():
    x = torch.tensor([[[[-1.0, 0.0], [1.0, 0.5]]]])
    u8 = uint8_images(x)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 3, 2, 2) and u8[0, :, 0, 0].tolist() == [0, 0, 0]
    assert u8[0, 0, 1, 0] == 255 and u8[0, 0, 0, 1] == 128


def test_committed_classifier_is_accurate():
    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("classifier weights not trained yet")
    held = load_dataset("mnist16", "heldout")
    with torch.no_grad():
        acc = float((load_classifier().forward(held.x).argmax(1) == held.labels).float().mean())
    assert acc > 0.95
    digits, noise = held.x[:200], torch.rand(200, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert fid_kid(noise, digits, kid_subset_size=100)["fid"] > 100  # in the committed feature space's units


def test_fid_kid_precision_recall_agree_with_torch_fidelity_calculate_metrics():
    """feature_metrics (torch-fidelity's metric functions on our features) = calculate_metrics(prc=True) itself."""
    import torch_fidelity

    from distill.eval.fid import EXTRACTOR, ImageTensorDataset, compute_features, feature_metrics, register_mnist16_extractor

    register_mnist16_extractor()
    noise = torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    gen = torch.cat([load_dataset("mnist16", "heldout").x[:300], noise])  # half digits, half noise: precision ~ 0.5
    ref = load_dataset("mnist16", "reference").x[:500]
    theirs = torch_fidelity.calculate_metrics(input1=ImageTensorDataset(gen), input2=ImageTensorDataset(ref), fid=True, kid=True,
                                              prc=True, feature_extractor=EXTRACTOR, cuda=False, verbose=False, save_cpu_ram=True,
                                              kid_subset_size=200)
    ours = feature_metrics(compute_features(gen), compute_features(ref), kid_subset_size=200)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4)
    assert abs(ours["precision"] - theirs["precision"]) <= 1 / 600 and abs(ours["recall"] - theirs["recall"]) <= 1 / 500
    assert 0.4 < ours["precision"] < 0.6 and ours["recall"] > 0.5  # the noise half lies outside the digits' manifold


def test_bootstrap_spread_matches_the_spread_over_fresh_draws():
    """FID's bootstrap standard deviation on one generated set ~ its standard deviation over 40 independent sets."""
    from distill.eval.fid import bootstrap_fid_std, feature_statistics, frechet_distance

    g = torch.Generator().manual_seed(1)
    ref = torch.randn(20000, 8, generator=g, dtype=torch.float64)
    mix = torch.eye(8, dtype=torch.float64) + 0.3 * torch.randn(8, 8, generator=g, dtype=torch.float64)

    def draw():
        return torch.randn(500, 8, generator=g, dtype=torch.float64) @ mix + 0.2

    fresh = torch.tensor([frechet_distance(*feature_statistics(draw()), *feature_statistics(ref)) for _ in range(40)]).std()
    boot = [bootstrap_fid_std(draw(), ref, resamples=100, seed=i) for i in range(3)]
    assert all(0.6 < b / float(fresh) < 1.6 for b in boot), (boot, float(fresh))
    assert bootstrap_fid_std(ref[:500], ref, seed=0) == bootstrap_fid_std(ref[:500], ref, seed=0)  # seeded

    # two classes far apart, 250 samples of each on every draw (as a bench cell's labels i mod K): the stratified
    # bootstrap keeps the counts and matches the fresh draws; resampling the counts too overstates the spread
    labels, shift = torch.arange(500) % 2, torch.zeros(8, dtype=torch.float64)
    shift[0] = 6.0

    def draw_classes():
        return draw() + labels[:, None] * shift

    fresh = torch.tensor([frechet_distance(*feature_statistics(draw_classes()), *feature_statistics(ref)) for _ in range(40)]).std()
    x = draw_classes()
    strat = bootstrap_fid_std(x, ref, resamples=100, strata=labels)
    assert 0.6 < strat / float(fresh) < 1.6 and bootstrap_fid_std(x, ref, resamples=100) > 2 * strat, (strat, float(fresh))
    with pytest.raises(ValueError, match="at least 2 bootstrap resamples"):
        bootstrap_fid_std(ref[:10], ref, resamples=1)


def test_paired_interval_covers_the_mean_difference_over_fresh_seeds():
    """Two generated sets from the same noise (row i of each from seed i), Gaussians measured against the exact reference
    N(0, I): the 95% paired interval of FID(a) - FID(b) covers the mean difference over fresh draws at the same sample
    count (Monte Carlo, 400 draws) in at least 53 of 60 independent repetitions, at 4 and at 32 dimensions (where
    resampling's repeated samples bias each FID), and the verdict follows the interval."""
    from distill.eval.fid import feature_statistics, frechet_distance, paired_fid_delta, verdict

    g = torch.Generator().manual_seed(0)
    for d, n in ((4, 800), (32, 400)):
        eye = torch.eye(d, dtype=torch.float64)
        m_a, m_b = torch.full((d,), 0.30, dtype=torch.float64), torch.full((d,), 0.25, dtype=torch.float64)
        mix_a, mix_b = eye + 0.2 * torch.randn(d, d, generator=g, dtype=torch.float64), 1.1 * eye
        ref = (torch.zeros(d, dtype=torch.float64), eye)

        def delta(z):
            return (frechet_distance(*feature_statistics(z @ mix_a + m_a), *ref)
                    - frechet_distance(*feature_statistics(z @ mix_b + m_b), *ref))

        target = sum(delta(torch.randn(n, d, generator=g, dtype=torch.float64)) for _ in range(400)) / 400
        hits = 0
        for r in range(60):
            z = torch.randn(n, d, generator=g, dtype=torch.float64)
            out = paired_fid_delta(z @ mix_a + m_a, z @ mix_b + m_b, ref, resamples=60, seed=r)
            hits += out["low"] <= target <= out["high"]
            assert out["low"] <= out["delta"] <= out["high"] and out["verdict"] == verdict(out["low"], out["high"])
        assert hits >= 53, f"d = {d}: the interval covered the mean difference {target:.3f} in {hits} of 60 repetitions"
    # pairing is what narrows it: two close entries on the same seeds differ by far less than either FID's spread
    from distill.eval.fid import bootstrap_fid_std

    ref_x = torch.randn(20000, d, generator=g, dtype=torch.float64)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix_a + m_a
    close = paired_fid_delta(a, a * 1.02 + 0.01, ref_x, resamples=60)
    assert close["high"] - close["low"] < 0.5 * bootstrap_fid_std(a, ref_x, resamples=60), close
    # the same set against itself: a zero-width interval at 0; reference features and their statistics agree
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    same = paired_fid_delta(z, z, z[:400], resamples=20)
    assert same["delta"] == same["low"] == same["high"] == 0.0 and same["verdict"] == "tied with"
    assert paired_fid_delta(z, z + 0.5, z[:400], resamples=20) == paired_fid_delta(z, z + 0.5, feature_statistics(z[:400]),
                                                                                     resamples=20)
    assert paired_fid_delta(z + 0.5, z, z[:400], resamples=20)["verdict"] == "above"
    with pytest.raises(ValueError, match="same seeds"):
        paired_fid_delta(z, z[:10], z)
