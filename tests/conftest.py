"""Shared test configuration."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import settings

# dev keeps the local loop fast; CI sets HYPOTHESIS_PROFILE=ci. Both are derandomized so a
# failure reproduces on every run.
settings.register_profile("dev", max_examples=10, derandomize=True, deadline=None)
settings.register_profile("ci", max_examples=100, derandomize=True, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Test helpers (tests/families.py) import as top-level modules under --import-mode=importlib.
sys.path.insert(0, str(Path(__file__).parent))
