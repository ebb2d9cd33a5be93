"""pyflakes' checks (ruff's F rules) pass over the whole tree.

The benchmarks and the job scripts are imported by no test, so a name left
undefined there by a refactor would otherwise show only when someone runs them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_undefined_or_unused_names() -> None:
    run = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, f"ruff check (rules in pyproject.toml):\n{run.stdout}{run.stderr}"
