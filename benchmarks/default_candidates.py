"""The ``ksam`` command line with the candidate rules for K-SAM's default registered
(docs/default_rule.md), for this process only::

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/default_candidates.py compare \\
        --task mnist1d --methods ksam:select=aum ksam:select=sample --out runs/x

Candidates beside :data:`ksam.selection.RULES`: ``auto-either`` and ``fit-either``
(:class:`ksam.selection.AutoBand` counting also confidently contradicted rows, with its
step window or with :class:`ksam.selection.FitGatedBand`'s gate), ``confident``
(:class:`ksam.selection.TopLossUncontradicted`), ``aum``
(:class:`ksam.selection.AreaUnderMargin`, per-example memory), ``sample``
(:class:`ksam.selection.LossSampled`) and ``increase``
(:class:`ksam.selection.LargestIncreaseTop`).
"""

from __future__ import annotations

import functools
import sys

from ksam import selection
from ksam.lab.cli import main

CANDIDATES = {
    "auto-either": functools.partial(selection.AutoBand, criterion="either"),
    "fit-either": functools.partial(selection.FitGatedBand, criterion="either"),
    "confident": selection.TopLossUncontradicted,
    "aum": selection.AreaUnderMargin,
    "sample": selection.LossSampled,
    "increase": selection.LargestIncreaseTop,
    "fit-confident": selection.GatedUncontradicted,
    "fit-aum": selection.GatedAreaUnderMargin,
}

if __name__ == "__main__":
    for name, factory in CANDIDATES.items():
        selection.RULES.setdefault(name, factory)
    sys.exit(main(sys.argv[1:]))
