"""``python -m higher``: the command line (see :mod:`higher.cli`)."""

import sys

from .cli import main

sys.exit(main())
