"""The resumable results file of the estimator benchmarks (``estimator_accuracy.py``,
``estimator_coverage.py``): one JSON object ``{"meta": [one entry per run], "rows": [one per
result]}``, rewritten whole after every result so that a stopped run resumes where it was."""

from __future__ import annotations

import json
import os
import sys
import time

import torch


def load(path: str | None) -> dict:
    """The file at `path`, or an empty ``{"meta": [], "rows": []}`` when there is none yet."""
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"meta": [], "rows": []}


def run_meta() -> dict:
    """What every run records about itself: its command, start time (UTC), intra-op threads and
    the load average at its start (the machine may be shared)."""
    return {"command": "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
            "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            "threads": torch.get_num_threads(), "load_average_start": os.getloadavg()}


def save(state: dict, path: str) -> None:
    """Write `state` to `path` through a temporary file, so that a run stopped mid-write leaves
    the previous file whole."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=1)
    os.replace(path + ".tmp", path)
