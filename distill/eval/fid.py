"""FID / KID through torch-fidelity, with a domain feature extractor for mnist16.

The mnist16 extractor is a small CNN classifier trained by the project (``scripts/train_classifier.py``)
whose 128-d penultimate activations replace Inception features: Inception features of 16x16 grey digits
say little. It is registered with torch-fidelity as ``mnist16-classifier`` so that
``torch_fidelity.calculate_metrics(..., feature_extractor="mnist16-classifier")`` computes FID and KID.

Loading: the sample sets here are tensors in memory, read in the main process (``save_cpu_ram=True``: no DataLoader
workers, nothing to load); torch-fidelity's loaders of image folders (its command line, ``fidelity_cli``) run under
``sized_fidelity_loaders``, which caps their workers at ``distill.core.cores.loader_workers()``.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distill.core.cores import loader_workers
from distill.core.nets import DEFAULT_WEIGHTS, Mnist16Classifier, load_classifier  # noqa: F401  (the extractor's network)

EXTRACTOR = "mnist16-classifier"
FEATURE = "penultimate"
INCEPTION = "inception-v3-compat"  # torch-fidelity's Inception (the usual FID features), for RGB images


def uint8_images(x: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1], [B, C, H, W] -> uint8 [B, 3, H, W], the input torch-fidelity expects."""
    u8 = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return u8.expand(-1, 3, -1, -1).contiguous() if u8.shape[1] == 1 else u8


def _make_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class Mnist16FeatureExtractor(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            self.net = load_classifier(feature_extractor_weights_path)

        @staticmethod
        def get_provided_features_list():
            return (FEATURE, "logits")

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"fid": FEATURE, "kid": FEATURE, "prc": FEATURE, "isc": "logits"}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 16, 16, dtype=torch.uint8)

        def forward(self, x):
            x = x[:, :1].float() / 127.5 - 1  # uint8 grey (repeated in 3 channels) -> [-1, 1]
            if x.shape[-2:] != (16, 16):
                x = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
            feats = self.net.embed(x)
            out = {FEATURE: feats, "logits": self.net.head(feats)}
            return tuple(out[name] for name in self.features_list)

    return Mnist16FeatureExtractor


def register_mnist16_extractor() -> str:
    """Register the extractor with torch-fidelity (once per process) and return its name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    if EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR, _make_extractor_class())
    return EXTRACTOR


@contextmanager
def sized_fidelity_loaders():
    """Within: torch-fidelity's feature DataLoaders get at most ``loader_workers()`` worker processes (it asks for
    min(4, 2 x cpu_count()), more than a process allowed fewer cores can run; ``distill.core.cores``)."""
    import torch_fidelity.utils as fidelity_utils

    original = fidelity_utils.DataLoader

    def sized(*args, num_workers: int = 0, **kwargs):
        return original(*args, num_workers=min(num_workers, loader_workers()), **kwargs)

    fidelity_utils.DataLoader = sized
    try:
        yield
    finally:
        fidelity_utils.DataLoader = original


class ImageTensorDataset(torch.utils.data.Dataset):
    """A tensor of samples in [-1, 1] seen as the uint8 3xHxW images torch-fidelity reads."""

    def __init__(self, x: torch.Tensor):
        self.images = uint8_images(x)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def content_hash(x: torch.Tensor) -> str:
    """A short hash of a sample set (after the uint8 conversion torch-fidelity sees), for cache names."""
    return hashlib.sha256(uint8_images(x).numpy().tobytes()).hexdigest()[:16]


def reference_cache_name(reference: torch.Tensor, extractor: str = EXTRACTOR) -> str:
    """The name under which ``fid_kid`` caches the statistics of ``reference``: extractor + content hash."""
    return f"{extractor}-ref-{content_hash(reference)}"


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID between Gaussians N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, Eq. 6), by torch-fidelity's
    ``fid_statistics_to_metric`` (the function ``calculate_metrics`` uses), in float64."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mu1, sigma1, mu2, sigma2 = (torch.as_tensor(v, dtype=torch.float64).cpu().numpy() for v in (mu1, sigma1, mu2, sigma2))
    return float(fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False)[KEY_METRIC_FID])


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of features [N, D] in float64, by torch-fidelity's ``fid_features_to_statistics``."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    stats = fid_features_to_statistics(features.detach().double().cpu())
    return torch.from_numpy(stats["mu"]), torch.from_numpy(stats["sigma"])


def compute_features(samples: torch.Tensor, *, extractor: str = EXTRACTOR, weights_path: str | None = None,
                     batch_size: int = 256) -> torch.Tensor:
    """The FID features [N, D] of samples in [-1, 1] through a torch-fidelity extractor (the same code path
    ``fid_kid`` uses)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    if extractor == EXTRACTOR:
        register_mnist16_extractor()
    layer = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")
    kwargs = {"feature_extractor_weights_path": weights_path} if weights_path else {}
    net = create_feature_extractor(extractor, [layer], cuda=False, verbose=False, **kwargs)
    feats = get_featuresdict_from_dataset(ImageTensorDataset(samples), net, batch_size, False, True, False)
    return feats[layer]


def fid_kid(samples: torch.Tensor, reference: torch.Tensor, *, extractor: str = EXTRACTOR, reference_name: str | None = None,
            kid_subset_size: int = 1000, weights_path: str | None = None, cache_root: str | None = None) -> dict:
    """FID and KID between two sample sets (values in [-1, 1]) with torch-fidelity.

    The reference statistics are cached under a name that includes the reference set's content hash
    (``reference_cache_name``).
    """
    import torch_fidelity

    if extractor == EXTRACTOR:
        register_mnist16_extractor()
    cache_name = f"{extractor}-{reference_name}" if reference_name else reference_cache_name(reference, extractor)
    kwargs = {"feature_extractor_weights_path": weights_path} if weights_path else {}
    metrics = torch_fidelity.calculate_metrics(
        input1=ImageTensorDataset(samples), input2=ImageTensorDataset(reference), fid=True, kid=True,
        feature_extractor=extractor, cuda=torch.cuda.is_available(), verbose=False, save_cpu_ram=True,
        kid_subset_size=min(kid_subset_size, len(samples), len(reference)), cache=cache_root is not None,
        cache_root=cache_root, input2_cache_name=cache_name if cache_root else None, **kwargs,
    )
    return {"fid": float(metrics["frechet_inception_distance"]), "kid": float(metrics["kernel_inception_distance_mean"])}


# -- metrics on features (torch-fidelity's own functions, so the numbers are calculate_metrics') -------
def feature_metrics(gen: torch.Tensor, ref: torch.Tensor, *, kid_subset_size: int = 1000) -> dict:
    """FID, KID (torch-fidelity's raw ``kernel_inception_distance_mean``, no scaling), precision and recall
    (Kynkaanniemi et al. 2019, k = 3) of generated features ``gen`` [N, D] against reference features ``ref``,
    computed by torch-fidelity's metric functions with ``calculate_metrics``' defaults."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    gen, ref = gen.detach().cpu(), ref.detach().cpu()
    fid = fid_statistics_to_metric(fid_features_to_statistics(gen), fid_features_to_statistics(ref), False)
    kid = kid_features_to_metric(gen, ref, kid_subset_size=min(kid_subset_size, len(gen), len(ref)), verbose=False)
    prc = prc_features_to_metric(gen, ref, save_cpu_ram=True, verbose=False)
    return {"fid": fid["frechet_inception_distance"], "kid": kid["kernel_inception_distance_mean"],
            "precision": prc["precision"], "recall": prc["recall"]}


def bootstrap_fid_std(gen: torch.Tensor, ref, *, resamples: int = 100, seed: int = 0,
                      strata: torch.Tensor | None = None) -> float:
    """The spread of FID over the generated set: the standard deviation of FID over ``resamples`` bootstrap
    resamples of ``gen`` (drawn with replacement, same size) against the fixed reference statistics. With
    ``strata`` (e.g. the class labels a benchmark assigns by sample index) each stratum is resampled within
    itself, so its count stays fixed as it does on fresh noise seeds. It stands for the change on fresh noise
    seeds (tested against independent draws in tests/test_fid.py). ``ref``: features [M, D] or their (mean, covariance)."""
    if resamples < 2:
        raise ValueError(f"need at least 2 bootstrap resamples, got {resamples}")
    mu_ref, cov_ref = ref if isinstance(ref, tuple) else feature_statistics(ref)
    groups = [torch.arange(len(gen))] if strata is None else [torch.nonzero(strata == s).flatten() for s in strata.unique()]
    g = torch.Generator().manual_seed(seed)

    def resample() -> torch.Tensor:
        return torch.cat([idx[torch.randint(len(idx), (len(idx),), generator=g)] for idx in groups])

    values = [frechet_distance(*feature_statistics(gen[resample()]), mu_ref, cov_ref) for _ in range(resamples)]
    return float(torch.tensor(values).std())


# -- FID-infinity: FID extrapolated to infinitely many samples ---------------------------------------------------
DEFAULT_SAMPLE_COUNTS = (500, 1000, 2000, 5000)  # Ns of ``fid_infinity``, capped at the number of generated features


@dataclass
class FidInfinity:
    """FID extrapolated to N -> infinity by ``fid_infinity``."""

    fid_inf: float  # the intercept of the line FID_N = FID_inf + slope / N
    stderr: float  # the standard error of that intercept, from the fit's residuals
    slope: float  # k, the 1/N bias coefficient
    points: list[tuple[int, float]]  # (N, FID_N averaged over the draws), the points of the fit


def default_sample_counts(n: int) -> list[int]:
    """``DEFAULT_SAMPLE_COUNTS`` capped at ``n`` features; n/4, n/2 and n when that leaves fewer than 3 distinct counts."""
    counts = sorted({min(k, n) for k in DEFAULT_SAMPLE_COUNTS})
    return counts if len(counts) >= 3 else sorted({max(2, n // 4), max(2, n // 2), n})


def fid_infinity(gen: torch.Tensor, ref, sample_counts=None, *, draws: int = 5, seed: int = 0) -> FidInfinity:
    """FID-infinity (Chong & Forsyth 2020, "Effectively Unbiased FID and Inception Score and where to find them",
    Sec. 3): FID from N samples is biased upward in 1/N, E[FID_N] = FID_inf + k / N + O(1/N^2) (the mean term's bias is
    exactly Tr(Sigma_g) / N), so the limit is the intercept of a line fit to FID_N against 1/N.

    For each N of ``sample_counts`` (default ``default_sample_counts``) FID_N is the mean over ``draws`` random subsets
    of N rows of the generated features ``gen`` [n, D], drawn without replacement, against the fixed reference ``ref``
    (features [M, D] or their (mean, covariance)). The line y = b0 + b1 x, x = 1/N, is fit by ordinary least squares over
    the m distinct Ns, and the intercept's standard error is sqrt(s^2 [(X^T X)^-1]_00) with s^2 = RSS / (m - 2), which
    needs m >= 3. That error says how well the points lie on the line; the noise of the one generated set all subsets
    come from is ``bootstrap_fid_std``'s. Subsets of a finite set of n keep the limit: their FID falls to the whole set's
    (itself biased by k/n) as N -> n, so the line reaches FID_inf at 1/N = 0 as for fresh samples."""
    n = len(gen)
    counts = default_sample_counts(n) if sample_counts is None else [int(k) for k in sample_counts]
    if len(set(counts)) < 3 or min(counts) < 2 or max(counts) > n:
        raise ValueError(f"FID-infinity needs at least 3 distinct sample counts from 2 to {n} (the generated features), "
                         f"got {list(counts)}")
    if draws < 1:
        raise ValueError(f"need at least 1 draw per sample count, got {draws}")
    mu_ref, cov_ref = ref if isinstance(ref, tuple) else feature_statistics(ref)
    g = torch.Generator().manual_seed(seed)

    def fid_at(k: int) -> float:
        return sum(frechet_distance(*feature_statistics(gen[torch.randperm(n, generator=g)[:k]]), mu_ref, cov_ref)
                   for _ in range(draws)) / draws

    points = [(k, fid_at(k)) for k in sorted(set(counts))]
    X = torch.tensor([[1.0, 1.0 / k] for k, _ in points], dtype=torch.float64)
    y = torch.tensor([f for _, f in points], dtype=torch.float64)
    b = torch.linalg.lstsq(X, y[:, None]).solution.flatten()
    s2 = float(((y - X @ b) ** 2).sum()) / (len(points) - 2)
    stderr = (s2 * float(torch.linalg.inv(X.T @ X)[0, 0])) ** 0.5
    return FidInfinity(fid_inf=float(b[0]), stderr=stderr, slope=float(b[1]), points=points)


# -- paired comparisons: two entries sampled from the same noise seeds --------------------------------------------
VERDICTS = ("below", "tied with", "above")


def paired_fid_delta(gen_a: torch.Tensor, gen_b: torch.Tensor, ref, *, resamples: int = 200, seed: int = 0,
                     strata: torch.Tensor | None = None, level: float = 0.95) -> dict:
    """FID(a) - FID(b) against one reference, with a ``level`` interval from a bootstrap that resamples the SAME indices
    of both generated sets: row i of ``gen_a`` and ``gen_b`` come from noise seed i, so what the two entries share (the
    seeds' luck) cancels and the interval is far narrower than either FID's spread. ``ref``: reference features [M, D]
    or their (mean, covariance), held fixed as in ``bootstrap_fid_std``; ``strata`` resamples within each class.
    The interval is delta +- z sd*, sd* the bootstrap standard deviation of the paired difference (the normal bootstrap
    interval, Efron & Tibshirani 1993, Eq. 13.5): it is for the difference at this sample count, the mean over fresh
    seeds, as the bench's FIDs are. Percentile-type intervals are not used: resampling with replacement repeats samples,
    which raises each FID by its own amount at 128-d features and shifts them away from delta.
    tests/test_fid.py checks its coverage on Gaussians, of the Monte-Carlo mean difference over fresh draws."""
    if gen_a.shape != gen_b.shape:
        raise ValueError(f"a paired comparison needs two sets of one shape (the same seeds), got {list(gen_a.shape)} and "
                         f"{list(gen_b.shape)}")
    if resamples < 20 or not 0 < level < 1:
        raise ValueError(f"need at least 20 bootstrap resamples and 0 < level < 1, got {resamples} and {level}")
    mu_ref, cov_ref = ref if isinstance(ref, tuple) else feature_statistics(ref)

    def delta(idx) -> float:
        return (frechet_distance(*feature_statistics(gen_a[idx]), mu_ref, cov_ref)
                - frechet_distance(*feature_statistics(gen_b[idx]), mu_ref, cov_ref))

    full = delta(torch.arange(len(gen_a)))
    boot = torch.tensor([delta(idx) for idx in resample_indices(len(gen_a), strata, resamples, seed)], dtype=torch.float64)
    return normal_interval(full, boot, level)


def resample_indices(n: int, strata: torch.Tensor | None, resamples: int, seed: int) -> list[torch.Tensor]:
    """The bootstrap's index sets of ``paired_fid_delta``: each stratum resampled within itself, with replacement."""
    groups = [torch.arange(n)] if strata is None else [torch.nonzero(strata == s).flatten() for s in strata.unique()]
    g = torch.Generator().manual_seed(seed)
    return [torch.cat([i[torch.randint(len(i), (len(i),), generator=g)] for i in groups]) for _ in range(resamples)]


def normal_interval(full: float, boot: torch.Tensor, level: float = 0.95) -> dict:
    """delta +- z sd* from a difference and its resampled differences (Efron & Tibshirani 1993, Eq. 13.5), and the verdict."""
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + level) / 2, dtype=torch.float64)))
    low, high = full - z * float(boot.std()), full + z * float(boot.std())
    return {"delta": full, "low": low, "high": high, "verdict": verdict(low, high)}


def verdict(low: float, high: float) -> str:
    """'below' when the whole interval of FID(a) - FID(b) is below 0, 'above' when above, else 'tied with'."""
    return VERDICTS[0] if high < 0 else VERDICTS[2] if low > 0 else VERDICTS[1]
