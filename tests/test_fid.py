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
