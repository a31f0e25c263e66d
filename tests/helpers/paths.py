"""Where the repository is, for tests that run its scripts or read its files (wherever the test file sits)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CLI_PY = REPO / "cli.py"
