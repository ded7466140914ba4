"""Does a model copy its training data? Two statistics on nearest neighbours in pixel space (L2).

* ``copy_rate``: the fraction of samples whose nearest training image is much closer than real held-out images'
  nearest training images are: closer than ``COPY_FACTOR`` times the 1st percentile of the held-out images'
  nearest-training distances (on mnist16 that percentile is 1.04; no held-out digit is nearer than 0.81, an
  exact copy is at 0). Real held-out data scores about 0; a model that copies a fraction f of its samples about f.
* ``closer_to_train``: the fraction of samples nearer to a training subset than to a held-out set of the same
  size (Meehan et al. 2020's idea in its simplest form). A sample from the data distribution that depends on
  neither set is equally likely to be nearer to either: 0.5 means no preference; above 0.5 leans to training.
"""

from __future__ import annotations

import torch

COPY_FACTOR = 0.5
COPY_QUANTILE = 0.01


def nearest_distances(x: torch.Tensor, pool: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """L2 distance [N] of every image in ``x`` to its nearest image in ``pool`` (flattened, float64)."""
    pool = pool.flatten(1).double()
    return torch.cat([torch.cdist(b.flatten(1).double(), pool).min(1).values for b in x.split(batch_size)])


class Memorization:
    """``copy_rate`` and ``closer_to_train`` of sample sets against a training set and held-out real data."""

    def __init__(self, train: torch.Tensor, heldout: torch.Tensor):
        if len(heldout) > len(train):
            raise ValueError(f"need at least as many training images as held-out ones, got {len(train)} and {len(heldout)}")
        self.train, self.heldout = train, heldout
        self.train_equal = train[:len(heldout)]  # the equal-size training subset of closer_to_train
        null = nearest_distances(heldout, train)
        self.threshold = COPY_FACTOR * float(null.quantile(COPY_QUANTILE))

    def __call__(self, x: torch.Tensor) -> dict:
        x = torch.nan_to_num(x.float(), nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1, 1)
        copy_rate = float((nearest_distances(x, self.train) < self.threshold).double().mean())
        closer = float((nearest_distances(x, self.train_equal) < nearest_distances(x, self.heldout)).double().mean())
        return {"copy_rate": copy_rate, "closer_to_train": closer}
