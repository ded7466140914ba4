"""The memorization statistics (distill/eval/memorization.py) and the bench's data rows on real mnist16 digits:
copies are flagged, held-out digits are not, the training-data row scores at or below the floor."""

import pytest
import torch

from distill.data import load_dataset
from distill.eval.bench import FidMetric
from distill.eval.memorization import Memorization, nearest_distances


@pytest.fixture(scope="module")
def digits():
    return {s: load_dataset("mnist16", s).x for s in ("train", "heldout", "reference", "floor")}


def test_nearest_distances_are_exact():
    pool = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert nearest_distances(torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]]), pool).tolist() == [0.0, 1.0, 5.0]


def test_held_out_digits_are_not_flagged(digits):
    mem = Memorization(digits["train"], digits["heldout"][:500])
    out = mem(digits["heldout"][500:])  # real digits that neither set contains
    assert out["copy_rate"] <= 0.01
    assert 0.4 < out["closer_to_train"] < 0.6  # no preference: 0.5 up to sampling noise (its std is 0.022 here)


def test_copies_of_training_digits_are_flagged(digits):
    mem = Memorization(digits["train"], digits["heldout"][:500])
    g = torch.Generator().manual_seed(0)
    near_copies = digits["train"][:500] + 0.01 * torch.randn(500, 1, 16, 16, generator=g)  # the equal-size training subset, blurred
    out = mem(near_copies)
    assert out["copy_rate"] == 1.0 and out["closer_to_train"] == 1.0
    copied = digits["train"][torch.randperm(4000, generator=g)[:250]]  # half copies of any training digit, half new digits
    out = mem(torch.cat([copied, digits["heldout"][500:750]]))
    assert 0.49 <= out["copy_rate"] <= 0.51 and out["closer_to_train"] > 0.5


def test_training_data_row_scores_at_or_below_the_floor_at_the_same_n(digits):
    metric = FidMetric(digits["reference"], bootstrap=0, floor_set=digits["floor"], train_set=digits["train"],
                       heldout_set=digits["heldout"])
    floor, training = metric.data_row("floor", 500), metric.data_row("training", 500)
    assert training["fid"] <= floor["fid"] and training["precision"] >= floor["precision"]
    assert training["copy_rate"] == 1.0 and "copy_rate" not in floor  # the floor holds training digits by necessity
    with pytest.raises(ValueError, match=r"has 2000 images, fewer than the 2001 samples per cell; allowed: --num-samples up to 2000"):
        metric.check(2001)
