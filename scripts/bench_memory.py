"""The sweep's peak memory at 200,000 apps and 2 million tasks.

**sweep-memory** — one full fswatch_sync sweep (default settings, journal and lease included) of
the `sweep` entry's steady-state mix at 200k apps / 2M tasks, run in a child process of its own so
that its peak resident set (``ru_maxrss``) is the sweep's and nothing else's: the interpreter,
SQLAlchemy, the scan of 200k directories and the batches. The child's outcome is verified like
every other sweep entry's. Target: at most 200 MiB.

Run this file directly (``python scripts/bench_memory.py child URL ROOT``) only as that child.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from bench_sweep import COUNT_KEYS, Scale, SqliteCopies, build_dataset, outcome, run_fswatch_sync
from benchkit import Contestant, Options, Result, Target, entry

FULL = Scale(apps=200_000, tasks=2_000_000)
QUICK = Scale(apps=2_000, tasks=20_000)
TARGET_MIB = 200.0


def _peak_kib() -> int:
    """This process's peak resident set. /proc's VmHWM belongs to this program's own memory
    map; getrusage's ru_maxrss is kept across fork and exec, so a child of a parent that built a
    200k-app dataset would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux


def child_main(url: str, root: str) -> int:
    run = run_fswatch_sync(url, Path(root))
    peak_kib = _peak_kib()
    print(json.dumps({"seconds": run.seconds, "counts": run.counts, "peak_kib": peak_kib}))
    return 0


@entry("sweep-memory", "peak memory of one sweep at 200k apps / 2M tasks (a child process)")
def sweep_memory(options: Options) -> Result:
    scale = QUICK if options.quick else FULL
    dataset = build_dataset(scale, options.workdir, options.log)
    copies = SqliteCopies(dataset)
    result = Result(
        entry="sweep-memory",
        title="peak resident memory of one fswatch_sync sweep (steady-state mix) in a process"
        " of its own",
        sizes={**dataset.sizes, "runs_each": 1},
        contestants=[Contestant("fswatch_sync", description="Sweeper.run, default settings")],
    )
    url = copies.fresh()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    done = subprocess.run(
        [sys.executable, __file__, "child", url, str(dataset.root)],
        capture_output=True, text=True, env=env, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the sweeping child failed: {done.stderr.strip().splitlines()[-1:]}")
    report = json.loads(done.stdout.strip().splitlines()[-1])
    digest, summary = outcome(url)
    copies.dispose()
    counts = {key: int(report["counts"][key]) for key in COUNT_KEYS}
    if counts != dataset.expected_counts or digest != dataset.expected_digest:
        result.ok = False
        result.notes.append(f"outcome differs: counted {counts}, rows {summary}")
    peak_mib = report["peak_kib"] / 1024
    result.contestant("fswatch_sync").samples.append(float(report["seconds"]))
    result.add_figure(
        "peak RSS", peak_mib, "MiB", Target("<=", TARGET_MIB), judged=not options.quick
    )
    result.notes.append(
        f"peak resident set of the sweeping process: {peak_mib:.0f} MiB"
        f" (target <= {TARGET_MIB:.0f} MiB) for {scale.apps:,} apps / {scale.tasks:,} tasks"
    )
    result.details = {"peak_kib": report["peak_kib"], "counts": counts, "scale": scale.__dict__}
    return result


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "child":
        sys.exit(child_main(sys.argv[2], sys.argv[3]))
    sys.exit("usage: bench_memory.py child URL ROOT (run by scripts/bench)")
