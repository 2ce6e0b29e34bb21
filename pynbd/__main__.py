"""``python -m pynbd`` is the same as the ``pynbd`` console script."""

import sys

from pynbd.cli import main

sys.exit(main())
