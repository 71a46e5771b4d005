"""``python -m ksam`` (also what torchrun runs: ``torchrun ... -m ksam compare``)."""

import sys

from .lab.cli import main

sys.exit(main())
