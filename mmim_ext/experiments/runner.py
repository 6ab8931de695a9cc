"""Resumable, shardable execution of the Table 1 protocol: one JSON file per run.

Every finished run is written to ``<out>/runs/<phase>/<arch>/<method>/lam<λ>_seed<s>.json``
(atomically: a temporary file, then a rename). A job whose records already exist with the same
settings is skipped, so an interrupted command resumes where it stopped, and several processes
(``shard=(i, n)``) can share one output directory on one machine: job ``k`` of the plan is first
shard ``k mod n``'s, and a shard with nothing of its own left helps with the others' jobs, taken
from the end of their queues. A process claims a job with a lock file holding its pid
(:mod:`mmim_ext.experiments.locks`), so no job runs twice and a job of a killed process is taken
over. The baseline of a seed, whose ``epochs_used`` is the budget of every other method on that
seed, is computed once, by whichever process claims it first, and read from disk by the others.

Phases: ``"tune"`` (λ grid on the tuning seeds, validation accuracy only, no measurements) and
``"table"`` (the chosen λ on the table's seeds, with the held-out information measurements).
"""

from __future__ import annotations

import glob
import json
import os
import time
from dataclasses import dataclass

from mmim_ext.experiments.locks import claim, release
from mmim_ext.experiments.protocol import BODY_OF, TUNED_METHODS, ProtocolConfig, run_body

__all__ = ["Job", "RunStore", "plan_table", "plan_tune", "run_jobs", "wait_for"]


@dataclass(frozen=True)
class Job:
    """One body to train: ``methods`` are the records taken from it."""

    phase: str
    arch: str
    body: str
    seed: int
    reg_weight: float
    methods: tuple[str, ...]


class RunStore:
    """The per-run JSON files under ``<root>/runs``."""

    def __init__(self, root: str):
        self.root = root

    def path(self, phase: str, arch: str, method: str, reg_weight: float, seed: int) -> str:
        lam = "0" if reg_weight == 0 else f"{reg_weight:.0e}"
        return os.path.join(self.root, "runs", phase, arch, method.replace("+", "_plus_"), f"lam{lam}_seed{seed}.json")

    def load(self, phase, arch, method, reg_weight, seed) -> dict | None:
        p = self.path(phase, arch, method, reg_weight, seed)
        if not os.path.isfile(p):
            return None
        with open(p) as f:
            return json.load(f)

    def save(self, phase: str, rec: dict) -> str:
        p = self.path(phase, rec["arch"], rec["method"], rec["reg_weight"], rec["seed"])
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = f"{p}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(dict(rec, phase=phase), f)
        os.replace(tmp, p)
        return p

    def records(self, phase: str | None = None) -> list[dict]:
        """Every stored record (of ``phase``, or of all phases)."""
        pattern = os.path.join(self.root, "runs", phase or "*", "*", "*", "*.json")
        out = []
        for p in sorted(glob.glob(pattern)):
            with open(p) as f:
                out.append(json.load(f))
        return out


def plan_tune(archs, seeds, grid, methods) -> list[Job]:
    """Every (arch, seed, λ) of every tuned body needed by ``methods``; the baselines first."""
    jobs = [Job("tune", a, "baseline", s, 0.0, ("baseline",)) for a in archs for s in seeds]
    bodies = []
    for m in methods:
        if m in TUNED_METHODS and BODY_OF[m] not in bodies:
            bodies.append(BODY_OF[m])
    for a in archs:
        for s in seeds:
            for b in bodies:
                wanted = tuple(m for m in methods if BODY_OF[m] == b)
                jobs += [Job("tune", a, b, s, float(lam), wanted) for lam in grid]
    return jobs


def plan_table(archs, seeds, methods, lambdas: dict) -> list[Job]:
    """The table's jobs: per seed the baseline body, then each (body, λ) once, with every method
    built on it (``mmim`` and ``c1`` share a body when their λ agree). ``lambdas[arch][method]``."""
    jobs = []
    for a in archs:
        for s in seeds:
            base = tuple(m for m in methods if BODY_OF[m] == "baseline")
            if base:
                jobs.append(Job("table", a, "baseline", s, 0.0, base))
    for a in archs:
        for s in seeds:
            groups: dict[tuple, list] = {}
            for m in methods:
                if BODY_OF[m] != "baseline":
                    groups.setdefault((BODY_OF[m], float(lambdas[a][m])), []).append(m)
            jobs += [Job("table", a, b, s, lam, tuple(ms)) for (b, lam), ms in groups.items()]
    return jobs


def _have(store: RunStore, job: Job, fingerprint: dict) -> bool:
    for m in job.methods:
        rec = store.load(job.phase, job.arch, m, job.reg_weight, job.seed)
        if rec is None:
            return False
        if rec.get("config") != fingerprint:
            raise ValueError(
                f"{store.path(job.phase, job.arch, m, job.reg_weight, job.seed)} was made with other settings "
                f"({rec.get('config')}) than this command ({fingerprint}); use another --out or delete it")
    return True


def _budget(store: RunStore, splits, cfg: ProtocolConfig, job: Job, measure, log, base_job: Job | None = None) -> int:
    """The seed's baseline epochs, computing the baseline body (``base_job``, the plan's baseline
    job of that seed) if no process has yet. While another live process computes it, wait; a
    claim left by a killed process is taken over (:mod:`mmim_ext.experiments.locks`)."""
    if base_job is None:
        base_job = Job(job.phase, job.arch, "baseline", job.seed, 0.0, ("baseline",))
    path = store.path(job.phase, job.arch, "baseline", 0.0, job.seed)
    while not _have(store, base_job, cfg.fingerprint()):
        if claim(path):
            try:
                if not _have(store, base_job, cfg.fingerprint()):
                    _execute(store, splits, cfg, base_job, None, measure, log)
            finally:
                release(path)
        else:
            time.sleep(2.0)
    return int(store.load(job.phase, job.arch, "baseline", 0.0, job.seed)["epochs_used"])


def _execute(store, splits, cfg, job: Job, budget, measure, log) -> None:
    t0 = time.perf_counter()
    recs = run_body(splits, cfg, job.body, job.seed, reg_weight=job.reg_weight, budget=budget,
                    methods=job.methods, measure=measure)
    for r in recs:
        store.save(job.phase, r)
    log(f"{job.phase} {job.arch} {'+'.join(job.methods)} λ={job.reg_weight:g} seed {job.seed}: "
        + ", ".join(f"{r['method']} val {r['acc_val']:.2f} test {r['acc_test']:.2f}" for r in recs)
        + f" ({recs[0]['epochs_used']} epochs, {time.perf_counter() - t0:.0f} s)")


def run_jobs(store: RunStore, splits, cfgs: dict, jobs: list[Job], *, shard=(0, 1), measure=None,
             log=print) -> int:
    """Run this shard's share of ``jobs`` (``cfgs[arch]`` the settings), skipping finished ones,
    then help with the other shards' share, from its end, so that no shard idles while another
    still has a queue.

    A job is claimed with a lock file next to its record (:mod:`mmim_ext.experiments.locks`), so
    two processes never run one job, and a job whose process was killed is taken over. Returns
    the number of jobs this process ran. ``measure`` (table phase) is applied to held-out features.
    """
    i, n = shard
    if not (isinstance(n, int) and n >= 1 and isinstance(i, int) and 0 <= i < n):
        raise ValueError(f"argument 'shard' must be (i, n) with 0 <= i < n, got {shard!r}")
    done = 0
    # Baselines first: each seed's budget is needed before its other jobs.
    base = [j for j in jobs if j.body == "baseline"]
    rest = [j for j in jobs if j.body != "baseline"]
    own = base[i::n] + [j for k, j in enumerate(rest) if k % n == i]
    others = [j for k, j in enumerate(base) if k % n != i] + [j for k, j in enumerate(rest) if k % n != i]
    base_of = {(j.phase, j.arch, j.seed): j for j in base}
    for job in own + others[::-1]:
        cfg = cfgs[job.arch]
        if _have(store, job, cfg.fingerprint()):
            continue
        path = store.path(job.phase, job.arch, job.methods[0], job.reg_weight, job.seed)
        if not claim(path):
            continue  # another live process runs it
        try:
            if _have(store, job, cfg.fingerprint()):  # finished between the check and the claim
                continue
            if job.body == "baseline":
                _execute(store, splits, cfg, job, None, measure, log)
            else:
                budget = _budget(store, splits, cfg, job, measure, log, base_of.get((job.phase, job.arch, job.seed)))
                _execute(store, splits, cfg, job, budget, measure, log)
        finally:
            release(path)
        done += 1
    return done


def wait_for(store: RunStore, jobs: list[Job], *, poll_s: float = 10.0, timeout_s: float | None = None,
             log=print) -> None:
    """Block until every record of ``jobs`` exists (other shards' share), or raise after ``timeout_s``."""
    t0 = time.monotonic()
    told = False
    while True:
        missing = [j for j in jobs for m in j.methods
                   if store.load(j.phase, j.arch, m, j.reg_weight, j.seed) is None]
        if not missing:
            return
        if not told:
            log(f"waiting for {len(missing)} runs of other shards ...")
            told = True
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{len(missing)} runs still missing after {timeout_s:.0f} s, e.g. {missing[0]}")
        time.sleep(poll_s)
