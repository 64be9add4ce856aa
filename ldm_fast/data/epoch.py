"""Epoch-aware dataset indices, so per-item randomness is fresh every pass over the data.

Datasets that draw randomness per item (super-resolution degradations, inpainting masks, KL
posterior samples from a latent cache) seed it by (seed, epoch, index): reproducible, hence
resumable, and different each epoch. The training loop's sampler is one endless stream across
epochs and DataLoader workers hold their own copies of the dataset, so calling `set_epoch` on
the dataset cannot reach them. Instead the sampler yields `EpochIndex` values — ints that carry
the epoch they belong to — and such datasets read it with `epoch_of`.
"""

from __future__ import annotations


class EpochIndex(int):
    """An int index with an `epoch` attribute; behaves as the plain index everywhere else."""

    def __new__(cls, index: int, epoch: int):
        obj = super().__new__(cls, index)
        obj.epoch = int(epoch)
        return obj

    def __reduce__(self):  # DataLoader workers receive indices pickled
        return EpochIndex, (int(self), self.epoch)

    def __repr__(self) -> str:
        return f"EpochIndex({int(self)}, epoch={self.epoch})"


def epoch_of(index, default: int) -> int:
    """The epoch an index belongs to: its own when it carries one, else `default` (set_epoch's)."""
    return getattr(index, "epoch", default)
