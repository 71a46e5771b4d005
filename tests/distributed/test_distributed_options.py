"""Distributed settings checked in one process: the collective timeout from the
environment, and the skip verdict taken through a ``finite_reducer``."""

from __future__ import annotations

import math
from datetime import timedelta

import pytest
import torch
from conftest import bn_net, sgd
from torch import nn

import ksam
import ksam.distributed as kd
from ksam import core
from ksam.core import ComputedStep


def test_dist_timeout_from_the_environment():
    assert kd.resolve_timeout(None, {}) == kd.DEFAULT_TIMEOUT
    assert kd.resolve_timeout(None, {"KSAM_DIST_TIMEOUT": "7.5"}) == timedelta(seconds=7.5)
    assert kd.resolve_timeout(3, {"KSAM_DIST_TIMEOUT": "7.5"}) == timedelta(seconds=3)
    for bad in ("abc", "0", "-1", "inf"):
        with pytest.raises(ValueError, match="KSAM_DIST_TIMEOUT"):
            kd.resolve_timeout(None, {"KSAM_DIST_TIMEOUT": bad})
    with pytest.raises(ValueError):
        kd.resolve_timeout(math.inf)


def test_verdict_goes_through_the_finite_reducer():
    class FakeDDP(nn.Module):  # what the engine looks for: no_sync
        def __init__(self):
            super().__init__()
            self.module = bn_net()

        def no_sync(self):
            raise AssertionError("not called")

    model = FakeDDP()
    calls = []
    eng = ksam.Plain(model, sgd(model), finite_reducer=lambda f: calls.append(f) or f)
    computed = ComputedStep(loss=torch.tensor(1.0), ascent_indices=torch.arange(0),
                            descent_indices=torch.arange(2), losses=None,
                            ascent_grad_norm=None, checks=[torch.tensor(1.0)])
    assert bool(core.verdict(eng._rt, computed).finite) and len(calls) == 1
