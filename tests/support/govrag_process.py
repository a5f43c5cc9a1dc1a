"""This checkout's `govrag` command in a process of its own, as a user runs it: its exit code, stdout and stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def govrag_env(**settings: str) -> dict[str, str]:
    """This process's environment without its GOVRAG_* variables, with these settings instead (data_dir="..." for
    GOVRAG_DATA_DIR)."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("GOVRAG_")}
    env.update({f"GOVRAG_{name.upper()}": value for name, value in settings.items()})
    return env


def run_govrag(argv: Sequence[str], *, env: Mapping[str, str] | None = None, prefix: Sequence[str] = (),
               timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`govrag argv` with `env` (this process's when None), run through the command `prefix`, until it exits; more
    than `timeout` seconds raises subprocess.TimeoutExpired."""
    return subprocess.run([*prefix, sys.executable, "-m", "api.cli", *argv], cwd=ROOT, env=env,  # noqa: S603
                          capture_output=True, text=True, timeout=timeout, check=False)
