"""The label-noise options of the tasks: which labels are flipped, to which class, and
whether the held-out split is noisy."""

from __future__ import annotations

import pytest
import torch

from ksam.lab.tasks import get_task


def test_pair_noise_flips_to_the_next_class():
    clean = get_task("mnist1d", num_samples=500)
    task = get_task("mnist1d", num_samples=500, label_noise=0.3, label_noise_type="pair",
                    seed=2)
    changed = task.train_y != clean.train_y
    assert int(changed.sum()) == 120 and torch.equal(task.noisy_mask, changed)
    assert torch.equal(task.train_y[changed], (clean.train_y[changed] + 1) % 10)
    # The same examples as symmetric noise with the same seed; only the new label differs.
    sym = get_task("mnist1d", num_samples=500, label_noise=0.3, seed=2)
    assert torch.equal(sym.noisy_mask, task.noisy_mask)
    with pytest.raises(ValueError, match="label_noise_type"):
        get_task("mnist1d", num_samples=500, label_noise=0.3, label_noise_type="flip")


def test_noisy_validation_labels():
    kw = dict(num_samples=500, validation_split=0.2, seed=1)
    clean = get_task("mnist1d", **kw)
    quiet = get_task("mnist1d", label_noise=0.25, **kw)
    noisy = get_task("mnist1d", label_noise=0.25, noisy_validation=True, **kw)
    assert torch.equal(quiet.test_y, clean.test_y)  # default: held-out labels stay clean
    assert torch.equal(noisy.test_x, clean.test_x) and torch.equal(noisy.train_y, quiet.train_y)
    changed = noisy.test_y != clean.test_y
    assert int(changed.sum()) == round(0.25 * clean.num_test) == 20
    pair = get_task("mnist1d", label_noise=0.25, label_noise_type="pair",
                    noisy_validation=True, **kw)
    flipped = pair.test_y != clean.test_y
    assert torch.equal(pair.test_y[flipped], (clean.test_y[flipped] + 1) % 10)
    # Without a held-out split the real test set is never noisy.
    test = get_task("mnist1d", num_samples=500, label_noise=0.25, noisy_validation=True)
    assert torch.equal(test.test_y, get_task("mnist1d", num_samples=500).test_y)
    with pytest.raises(ValueError, match="noisy_validation"):
        get_task("mnist1d", num_samples=500, noisy_validation="yes")
