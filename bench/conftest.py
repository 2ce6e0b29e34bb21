"""pytest-benchmark suite for pynbd's pure parts (no sockets, no files).

Run: ``/work/venv/bin/python -m pytest bench/ --benchmark-only`` (the main
test run does not collect this directory: pyproject sets testpaths = tests).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Let ``pytest bench/`` import pynbd from this checkout without installing it.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
