"""``python -m attncompiler``: the command line of :mod:`attncompiler.cli`."""

import sys

from .cli import main

sys.exit(main())
