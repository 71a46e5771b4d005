"""``python -m ksam`` (also what torchrun runs: ``torchrun ... -m ksam compare``)."""

import sys

from .cli import main

sys.exit(main())
