"""The fault-scenario harness: a registry, one result format, and the report generated from it.

Writing a scenario (any module in this package is picked up by :func:`load_all`)::

    from faults.harness import Run, scenario

    @scenario("crash-kill9", backends=("sqlite", "postgres"), quick=3, long=200,
              summary="kill -9 the daemon at random points of deletion bursts")
    def crash_kill9(run: Run) -> str:
        rng = run.rng()
        ...  # run.rounds rounds in run.workdir; raise AssertionError when an invariant breaks
        return "200 kills (37 mid-burst); every app handled or untouched"

A scenario runs ``run.rounds`` rounds seeded by ``run.seed`` (a failure names its seed, so the
run can be replayed), in the scratch directory ``run.workdir``, against ``run.backend`` (None for
a scenario that needs no database). It returns a one-line summary for the report's details
column, or raises: any exception marks the result ``fail`` with the exception as details;
:class:`Unavailable` says a prerequisite is missing (a database server not reachable, a kernel
limit not adjustable) — pytest skips then (fails under ``FSWATCH_SYNC_REQUIRE_DATABASES=1``),
the script records ``fail``.

The result format (one JSON file per scenario and backend, ``<results>/<scenario>.json`` or
``<results>/<scenario>.<backend>.json``)::

    {"scenario": str, "rounds": int, "outcome": "pass" | "fail", "details": str,
     "seed": int | null, "backend": str | null, "duration_s": float,
     "mode": "quick" | "long" | "custom", "command": str, "finished_at": ISO-8601 UTC}

The first seven keys are the contract; the last three are informative. ``docs/reliability.md``
is rendered from these files by :func:`render_report` (through ``scripts/reliability``), never
typed by hand.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import platform
import random
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

OUTCOMES = ("pass", "fail")
MODES = ("quick", "long", "custom")
RESULT_KEYS = ("scenario", "rounds", "outcome", "details", "seed", "backend", "duration_s")
SEED_ENV = "FSWATCH_SYNC_FAULT_SEED"
REQUIRE_ENV = "FSWATCH_SYNC_REQUIRE_DATABASES"
DETAILS_LIMIT = 600


class Unavailable(Exception):
    """Something the scenario needs is not on this machine (a server, a permission)."""


@dataclass(frozen=True)
class Run:
    """What a scenario is asked to do."""

    rounds: int
    seed: int
    backend: str | None
    workdir: Path
    mode: str = "quick"

    def rng(self) -> random.Random:
        return random.Random(self.seed)

    @property
    def quick(self) -> bool:
        return self.mode == "quick"


ScenarioFn = Callable[[Run], str]


@dataclass(frozen=True)
class Scenario:
    name: str
    backend: str | None
    fn: ScenarioFn
    quick_rounds: int
    long_rounds: int
    summary: str
    timeout_s: float

    @property
    def key(self) -> str:
        return self.name if self.backend is None else f"{self.name}.{self.backend}"

    def rounds_for(self, mode: str) -> int:
        return self.long_rounds if mode == "long" else self.quick_rounds


@dataclass(frozen=True)
class Result:
    scenario: str
    rounds: int
    outcome: str
    details: str
    seed: int | None
    backend: str | None
    duration_s: float
    mode: str = "custom"
    command: str = ""
    finished_at: str = ""
    # Not written to the result file: the traceback of a failure, for logs and pytest output.
    trace: str = field(default="", compare=False, repr=False)

    @property
    def key(self) -> str:
        return self.scenario if self.backend is None else f"{self.scenario}.{self.backend}"

    @property
    def passed(self) -> bool:
        return self.outcome == "pass"

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "rounds": self.rounds,
            "outcome": self.outcome,
            "details": self.details,
            "seed": self.seed,
            "backend": self.backend,
            "duration_s": round(self.duration_s, 3),
            "mode": self.mode,
            "command": self.command,
            "finished_at": self.finished_at,
        }

    @classmethod
    def from_json(cls, data: object) -> Result:
        """Parse one result file's object; ValueError names what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("a result must be a JSON object")
        missing = [key for key in RESULT_KEYS if key not in data]
        if missing:
            raise ValueError(f"missing key(s): {', '.join(missing)}")
        if data["outcome"] not in OUTCOMES:
            raise ValueError(f"outcome {data['outcome']!r} is not one of {OUTCOMES}")
        if not isinstance(data["scenario"], str) or not data["scenario"]:
            raise ValueError("scenario must be a non-empty string")
        if not isinstance(data["rounds"], int) or isinstance(data["rounds"], bool):
            raise ValueError("rounds must be an integer")
        if data["seed"] is not None and not isinstance(data["seed"], int):
            raise ValueError("seed must be an integer or null")
        if data["backend"] is not None and not isinstance(data["backend"], str):
            raise ValueError("backend must be a string or null")
        if not isinstance(data["duration_s"], int | float):
            raise ValueError("duration_s must be a number")
        return cls(
            scenario=data["scenario"],
            rounds=data["rounds"],
            outcome=data["outcome"],
            details=str(data["details"]),
            seed=data["seed"],
            backend=data["backend"],
            duration_s=float(data["duration_s"]),
            mode=str(data.get("mode", "custom")),
            command=str(data.get("command", "")),
            finished_at=str(data.get("finished_at", "")),
        )

    def write(self, results_dir: Path) -> Path:
        results_dir.mkdir(parents=True, exist_ok=True)
        path = results_dir / f"{self.key}.json"
        temporary = path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        temporary.replace(path)
        if self.trace:
            (results_dir / f"{self.key}.trace.txt").write_text(self.trace, encoding="utf-8")
        return path


# -- the registry ------------------------------------------------------------------------------

REGISTRY: dict[str, Scenario] = {}


def scenario(
    name: str,
    *,
    backends: Sequence[str | None] = (None,),
    quick: int,
    long: int,
    summary: str,
    timeout_s: float = 3600.0,
) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register ``fn`` once per backend under ``name`` (kebab-case, unique)."""

    def register(fn: ScenarioFn) -> ScenarioFn:
        for backend in backends:
            spec = Scenario(name, backend, fn, quick, long, summary, timeout_s)
            existing = REGISTRY.get(spec.key)
            if existing is not None and existing.fn is not fn:
                raise ValueError(f"scenario {spec.key!r} is registered twice")
            REGISTRY[spec.key] = spec
        return fn

    return register


LOAD_ERRORS: dict[str, str] = {}


def load_all() -> dict[str, Scenario]:
    """Import every module of this package, so that every scenario has registered itself.

    A module that fails to import is named in :data:`LOAD_ERRORS` (and in the report) instead
    of stopping every other scenario.
    """
    package = sys.modules[__package__ or "faults"]
    for module in pkgutil.iter_modules(package.__path__):
        name = f"{package.__name__}.{module.name}"
        try:
            importlib.import_module(name)
        except Exception as exc:
            LOAD_ERRORS[name] = one_line(f"{type(exc).__name__}: {exc}")
        else:
            LOAD_ERRORS.pop(name, None)
    return dict(sorted(REGISTRY.items()))


def get(name: str, backend: str | None = None) -> Scenario:
    key = name if backend is None else f"{name}.{backend}"
    if key not in REGISTRY:
        load_all()
    try:
        return REGISTRY[key]
    except KeyError:
        raise KeyError(f"no scenario {key!r}; known: {', '.join(sorted(REGISTRY))}") from None


# -- running -------------------------------------------------------------------------------------


def default_seed() -> int:
    fixed = os.environ.get(SEED_ENV, "").strip()
    return int(fixed) if fixed else secrets.randbelow(2**31)


def one_line(text: str, limit: int = DETAILS_LIMIT) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def execute(
    name: str,
    backend: str | None = None,
    *,
    rounds: int | None = None,
    seed: int | None = None,
    mode: str = "quick",
    workdir: Path | None = None,
    results_dir: Path | None = None,
    command: str = "",
    reraise_unavailable: bool = False,
) -> Result:
    """Run one registered scenario and return (and, with ``results_dir``, write) its result.

    Without ``workdir`` a temporary directory is used and removed afterwards — kept when the
    scenario failed, and named in the details.
    """
    spec = get(name, backend)
    chosen_rounds = rounds if rounds is not None else spec.rounds_for(mode)
    chosen_seed = seed if seed is not None else default_seed()
    own_dir = workdir is None
    directory = workdir or Path(tempfile.mkdtemp(prefix=f"fswatch-fault-{spec.key}-"))
    run = Run(chosen_rounds, chosen_seed, backend, directory, mode)
    started = time.monotonic()
    trace = ""
    try:
        details = spec.fn(run)
        outcome = "pass"
    except Unavailable as exc:
        if reraise_unavailable:
            raise
        outcome, details = "fail", f"not run: {exc}"
    except Exception as exc:
        outcome = "fail"
        trace = traceback.format_exc()
        message = str(exc) or type(exc).__name__
        details = f"{message} (seed {chosen_seed}; work dir {directory})"
    duration = time.monotonic() - started
    if own_dir and outcome == "pass":
        shutil.rmtree(directory, ignore_errors=True)
    result = Result(
        scenario=spec.name,
        rounds=chosen_rounds,
        outcome=outcome,
        details=one_line(details),
        seed=chosen_seed,
        backend=backend,
        duration_s=duration,
        mode=mode,
        command=command,
        finished_at=datetime.now(UTC).replace(microsecond=0).isoformat(),
        trace=trace,
    )
    if results_dir is not None:
        result.write(results_dir)
    return result


def run_quick_in_pytest(
    name: str, backend: str | None, workdir: Path, *, rounds: int | None = None
) -> Result:
    """What a CI test does: the quick rounds (the test asserts ``.passed``), skipping when the
    scenario's database is unavailable (failing instead when databases are required).

    With ``FSWATCH_SYNC_FAULT_RESULTS`` set, the result is also written there.
    """
    import pytest

    results = os.environ.get("FSWATCH_SYNC_FAULT_RESULTS")
    try:
        result = execute(
            name,
            backend,
            rounds=rounds,
            mode="quick",
            workdir=workdir,
            results_dir=Path(results) if results else None,
            command="pytest",
            reraise_unavailable=True,
        )
    except Unavailable as exc:
        if os.environ.get(REQUIRE_ENV, "") in ("1", "true", "yes"):
            pytest.fail(f"{name}[{backend}]: required but unavailable: {exc}")
        pytest.skip(f"{name}[{backend}]: {exc}")
    if not result.passed:
        print(result.trace, file=sys.stderr)
    return result


# -- the report -----------------------------------------------------------------------------------


def load_results(results_dir: Path) -> tuple[list[Result], list[str]]:
    """Every readable result in ``results_dir``, and a note for each file that is not one."""
    results: list[Result] = []
    problems: list[str] = []
    if not results_dir.is_dir():
        return results, problems
    for path in sorted(results_dir.glob("*.json")):
        try:
            results.append(Result.from_json(json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, ValueError) as exc:
            problems.append(f"{path.name}: {exc}")
    return results, problems


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def render_report(
    results: Iterable[Result],
    *,
    scenarios: dict[str, Scenario],
    generated_at: datetime,
    command: str,
    problems: Sequence[str] = (),
    environment: Sequence[str] = (),
) -> str:
    """docs/reliability.md: the table of results, and how it was made."""
    by_key = {r.key: r for r in results if r.key in scenarios}
    ignored = sorted(r.key for r in results if r.key not in scenarios)
    rows = []
    for key, spec in sorted(scenarios.items()):
        result = by_key.get(key)
        if result is None:
            rows.append(
                f"| {spec.name} | {spec.backend or '-'} | - | not run | - | - |"
                " no result file yet |"
            )
            continue
        rows.append(
            "| {} | {} | {} | **{}** | {} | {} | {} |".format(
                result.scenario,
                result.backend or "-",
                result.rounds,
                result.outcome,
                result.seed if result.seed is not None else "-",
                _duration(result.duration_s),
                _cell(result.details),
            )
        )
    passed = sum(1 for r in by_key.values() if r.passed)
    failed = sum(1 for r in by_key.values() if not r.passed)
    not_run = len(scenarios) - len(by_key)
    modes = sorted({r.mode for r in by_key.values()})
    commands = sorted({r.command for r in by_key.values() if r.command})
    lines = [
        "# Reliability under faults",
        "",
        "<!-- Generated by scripts/reliability from the scenario result files. Do not edit by"
        " hand: rerun the script. -->",
        "",
        "Evidence for issue 5: what the tool does when production hurts it — killed processes,"
        " database outages, races, event floods, hostile input. Every row below was produced by"
        " running the scenario; this page is generated from the result files, not typed.",
        "",
        f"- Generated: {generated_at.astimezone(UTC).replace(microsecond=0).isoformat()}"
        f" by `{command}`",
        f"- Rounds: {', '.join(modes) if modes else 'none'}"
        " (`scripts/reliability` runs the long rounds, `scripts/reliability --quick` the quick"
        " ones, which CI also runs as pytest tests)",
    ]
    if commands:
        lines.append("- Results produced by: " + ", ".join(f"`{c}`" for c in commands))
    lines += [f"- {item}" for item in environment]
    lines += [
        f"- Outcome: {passed} pass, {failed} fail, {not_run} not run",
        "",
        "| scenario | backend | rounds | outcome | seed | time | details |",
        "|---|---|---:|---|---:|---:|---|",
        *rows,
        "",
        "## What each scenario does",
        "",
    ]
    described: set[str] = set()
    for spec in sorted(scenarios.values(), key=lambda s: s.name):
        if spec.name in described:
            continue
        described.add(spec.name)
        variants = sorted(
            (s for s in scenarios.values() if s.name == spec.name), key=lambda s: s.backend or ""
        )
        rounds = "; ".join(
            f"{s.backend or 'no database'}: quick {s.quick_rounds}, long {s.long_rounds} rounds"
            for s in variants
        )
        lines.append(f"- **{spec.name}** ({rounds}): {spec.summary}")
    lines += [
        "",
        "## Replaying",
        "",
        "A scenario is seeded; replay one with the seed from its row:",
        "",
        "    scripts/reliability --only <scenario> --backend <backend> --seed <seed>"
        " --rounds <rounds>",
        "",
        "or, for the quick rounds under pytest, `FSWATCH_SYNC_FAULT_SEED=<seed> pytest"
        " tests/test_faults_crash.py tests/test_faults_outage.py`. Timing-driven scenarios"
        " (kill points, outages) follow the seed's plan, but the daemon's own timing varies"
        " from run to run.",
    ]
    if ignored or problems or LOAD_ERRORS:
        lines += ["", "## Problems", ""]
        lines += [f"- scenario module `{name}` did not load: {error}"
                  for name, error in sorted(LOAD_ERRORS.items())]
        lines += [f"- `{key}.json`: no such scenario registered" for key in ignored]
        lines += [f"- {problem}" for problem in problems]
    return "\n".join(lines) + "\n"


def environment_notes() -> list[str]:
    return [
        f"Machine: {platform.system()} {platform.release()}, Python"
        f" {platform.python_version()}, {os.cpu_count()} CPU(s)"
    ]
