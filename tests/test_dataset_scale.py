"""An HF image dataset on disk (issue #33): only a batch's rows are decoded, and a run stopped and resumed on it ends
bit-identical to one run straight through. The 100,000-row measurement is ``scripts/engine_memory.py --parts dataset``
(results/engine/memory.md)."""

from __future__ import annotations

import pytest
import torch
from distill_helpers import ROOT, run, same_tensors

import distill.data
from distill.data import IndexedData, dataset_for
from distill.engine.config import parse_overrides
from distill.engine.run_config import load_run_config
from distill.eval.engine_bench.memory_dataset import student_files_identical, synthesize_dataset

ROWS = 2000
UNET = ("{block_out_channels: [8, 16], down_block_types: [DownBlock2D, DownBlock2D], up_block_types: [UpBlock2D, UpBlock2D], "
        "layers_per_block: 1, norm_num_groups: 4}")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A ``save_to_disk`` folder of 2,000 random 16x16 grayscale images (labels 0..9), written in chunks of 700 rows."""
    return synthesize_dataset(tmp_path_factory.mktemp("data") / "images", ROWS, chunk=700)


def counting(monkeypatch) -> list[int]:
    """Count the images ``distill.data`` decodes (its ``image_tensor`` calls)."""
    calls, real = [0], distill.data.image_tensor

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(distill.data, "image_tensor", counted)
    return calls


def test_a_batch_decodes_only_its_rows_from_the_memory_mapped_table(saved, monkeypatch):
    import datasets

    calls = counting(monkeypatch)
    data = IndexedData(dataset_for(f"hf:{saved}", (1, 16, 16)))
    assert len(data) == ROWS and data.tensors is None and calls[0] == 0  # opening the set decodes nothing
    table = data.data.ds.data
    assert isinstance(table, datasets.table.MemoryMappedTable) and table.nbytes > 0  # the Arrow table stays on disk
    idx = torch.tensor([1999, 3, 1000, 3, 512])
    x, y = data.batch(idx)
    assert calls[0] == len(idx) and x.shape == (5, 1, 16, 16) and y.tolist() == [9, 3, 0, 3, 2]
    assert torch.equal(x[1], x[3]) and not torch.equal(x[0], x[1]) and -1 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(x[2], data.data[1000][0])  # the batch's row is the row read alone
    # the images are the synthesized ones (PNG in the table, lossless): rows of the 700-row chunks in order
    raw = datasets.load_from_disk(str(saved))[1000]["image"]
    assert torch.equal(x[2], distill.data.image_tensor(raw, "L", 16))


def cfg(out, saved, *overrides):
    return load_run_config(ROOT / "configs" / "distill" / "cd_mnist16.yaml", parse_overrides([
        f"dataset=hf:{saved}", "objective.name=diffusion", "student.arch=unet", f"student.model={UNET}",
        "student.parameterization=denoiser", "batch_size=16", "max_steps=6", "checkpoint_every=3", "log_every=3",
        *overrides, f"output_dir={out}"]))


def test_a_run_stopped_and_resumed_on_a_saved_dataset_is_bit_identical(saved, tmp_path, monkeypatch):
    calls = counting(monkeypatch)
    run(cfg(tmp_path / "full", saved))
    assert calls[0] == 6 * 16  # the steps' batches, and nothing more (no pass over the 2,000 rows)
    run(cfg(tmp_path / "split", saved), stop_at=3)
    assert not (tmp_path / "split" / "student.safetensors").exists()
    run(cfg(tmp_path / "split", saved), resume="latest")
    assert calls[0] == 2 * 6 * 16
    assert student_files_identical(tmp_path / "full", tmp_path / "split") == {
        "student.safetensors": True, "student_ema.safetensors": True}
    assert same_tensors(tmp_path / "full" / "student.safetensors", tmp_path / "split" / "student.safetensors")
    # the comparison can fail: the same run on other pixels (each decoded image negated) ends elsewhere
    real = distill.data.image_tensor
    monkeypatch.setattr(distill.data, "image_tensor", lambda *a, **k: -real(*a, **k))
    run(cfg(tmp_path / "negated", saved))
    assert not same_tensors(tmp_path / "full" / "student.safetensors", tmp_path / "negated" / "student.safetensors")
