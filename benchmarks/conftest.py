"""pytest-benchmark configuration for ``benchmarks/`` (never collected by ``pytest tests``).

Sizes come from environment variables so that no command-line option has to be registered:
``MMIM_EXT_BENCH_M`` (default 256), ``MMIM_EXT_BENCH_B`` (256), ``MMIM_EXT_BENCH_K`` (16),
``MMIM_EXT_BENCH_R`` (1), ``MMIM_EXT_BENCH_ROUNDS`` (3), ``MMIM_EXT_BENCH_COMPILED`` (1: include
torch.compile(reference); 0: skip it).
"""

from __future__ import annotations

import os
import sys

import pytest

# compare.py holds the inputs, backends and checks shared with the comparison script.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise pytest.UsageError(f"environment variable {name} must be an integer, got {raw!r}") from None
    if value < 1 and name != "MMIM_EXT_BENCH_COMPILED":
        raise pytest.UsageError(f"environment variable {name} must be >= 1, got {value}")
    return value


@pytest.fixture(scope="session")
def bench_size() -> dict:
    """Benchmark cell size (m, B, K, R) and rounds, from the MMIM_EXT_BENCH_* variables."""
    return {
        "m": _env_int("MMIM_EXT_BENCH_M", 256),
        "B": _env_int("MMIM_EXT_BENCH_B", 256),
        "K": _env_int("MMIM_EXT_BENCH_K", 16),
        "R": _env_int("MMIM_EXT_BENCH_R", 1),
        "rounds": _env_int("MMIM_EXT_BENCH_ROUNDS", 3),
        "compiled": _env_int("MMIM_EXT_BENCH_COMPILED", 1) != 0,
    }
