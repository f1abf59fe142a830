"""The benchmark harness behind ``scripts/bench``: a registry of named entries, results, tables.

An entry is one published figure (the full sweep, event latency, watch cost, ...) measured
against its comparison(s) in one run. To add one, write ``scripts/bench_<topic>.py`` with a
function decorated by :func:`entry`; ``scripts/bench`` imports every ``bench_*.py`` beside it,
so the new entry shows up in ``--list``, runs by default and can be picked with ``--only``.

The function gets :class:`Options` (``quick`` for the CI smoke sizes, the number of runs, a
private scratch directory, a progress logger) and returns a :class:`Result`: the sizes it used,
one :class:`Contestant` per measured contender with every sample, the ratios between them with
their targets, and whether the contenders agreed on the outcome (``ok``). In quick mode targets
are shown but never judged.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

Scalar = int | float | str | bool | None


@dataclass(frozen=True)
class Options:
    """What the harness tells an entry about this run."""

    quick: bool
    runs: int
    workdir: Path
    log: Callable[[str], None]


@dataclass
class Contestant:
    """One contender of an entry and every sample measured for it (seconds, unless ``unit``)."""

    name: str
    samples: list[float] = field(default_factory=list)
    unit: str = "s"
    description: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "unit": self.unit,
            "samples": self.samples,
            "median": self.median,
            "min": min(self.samples) if self.samples else None,
            "max": max(self.samples) if self.samples else None,
        }


@dataclass(frozen=True)
class Target:
    """A bound a ratio must respect: ``>= 20`` or ``<= 1.5``."""

    op: Literal[">=", "<="]
    bound: float

    def met(self, value: float) -> bool:
        return value >= self.bound if self.op == ">=" else value <= self.bound

    def __str__(self) -> str:
        return f"{self.op} {self.bound:g}x"

    def describe(self, unit: str) -> str:
        """The bound of an absolute :class:`Figure`: ``<= 15 ms``, ``<= 64 watches``."""
        return f"{self.op} {format_value(self.bound, unit)}"


@dataclass
class Ratio:
    """``numerator median / denominator median``, with an optional target."""

    numerator: str
    denominator: str
    value: float
    target: Target | None = None
    judged: bool = True

    @property
    def met(self) -> bool | None:
        if self.target is None or not self.judged:
            return None
        return self.target.met(self.value)

    @property
    def label(self) -> str:
        return f"{self.numerator} / {self.denominator}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "numerator": self.numerator,
            "denominator": self.denominator,
            "value": self.value,
            "target": str(self.target) if self.target else None,
            "met": self.met,
        }


@dataclass
class Figure:
    """An absolute figure (a p99, a watch count, CPU seconds), with an optional target."""

    label: str
    value: float
    unit: str = "s"
    target: Target | None = None
    judged: bool = True

    @property
    def met(self) -> bool | None:
        if self.target is None or not self.judged:
            return None
        return self.target.met(self.value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "value": self.value,
            "unit": self.unit,
            "target": self.target.describe(self.unit) if self.target else None,
            "met": self.met,
        }


@dataclass
class Result:
    """What one entry measured."""

    entry: str
    title: str
    sizes: dict[str, Scalar] = field(default_factory=dict)
    contestants: list[Contestant] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    ok: bool = True
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def contestant(self, name: str) -> Contestant:
        for item in self.contestants:
            if item.name == name:
                return item
        raise KeyError(name)

    def add_ratio(
        self, numerator: str, denominator: str, target: Target | None, *, judged: bool
    ) -> Ratio:
        top, bottom = self.contestant(numerator).median, self.contestant(denominator).median
        value = top / bottom if bottom > 0 else float("inf")
        ratio = Ratio(numerator, denominator, value, target, judged)
        self.ratios.append(ratio)
        return ratio

    def add_figure(
        self, label: str, value: float, unit: str, target: Target | None, *, judged: bool
    ) -> Figure:
        figure = Figure(label, value, unit, target, judged)
        self.figures.append(figure)
        return figure

    @property
    def targets_met(self) -> bool:
        return all(ratio.met is not False for ratio in self.ratios) and all(
            figure.met is not False for figure in self.figures
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "entry": self.entry,
            "title": self.title,
            "sizes": self.sizes,
            "contestants": [c.to_dict() for c in self.contestants],
            "ratios": [r.to_dict() for r in self.ratios],
            "figures": [f.to_dict() for f in self.figures],
            "ok": self.ok,
            "targets_met": self.targets_met,
            "notes": self.notes,
            "details": self.details,
        }


EntryFunction = Callable[[Options], Result]


@dataclass(frozen=True)
class Entry:
    name: str
    title: str
    function: EntryFunction


REGISTRY: dict[str, Entry] = {}


def entry(name: str, title: str) -> Callable[[EntryFunction], EntryFunction]:
    """Register a benchmark entry under ``name`` (run in registration order)."""

    def register(function: EntryFunction) -> EntryFunction:
        if name in REGISTRY:
            raise RuntimeError(f"benchmark entry {name!r} registered twice")
        REGISTRY[name] = Entry(name, title, function)
        return function

    return register


# -- the machine ------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def _git_commit(directory: Path) -> str | None:
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def machine_description(checkout: Path | None = None) -> dict[str, Scalar]:
    """CPU, cores, memory, OS, Python, SQLite and library versions, and the code measured."""
    import sqlalchemy

    import fswatch_sync

    memory = _memory_bytes()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "fswatch_sync": fswatch_sync.__version__,
        "commit": _git_commit(checkout) if checkout else None,
    }


# -- output -----------------------------------------------------------------------------------


def format_seconds(value: float) -> str:
    if value != value:  # NaN
        return "-"
    if value >= 10:
        return f"{value:.1f} s"
    if value >= 1:
        return f"{value:.2f} s"
    if value >= 0.01:
        return f"{value * 1000:.0f} ms"
    return f"{value * 1000:.2f} ms"


def format_value(value: float, unit: str) -> str:
    return format_seconds(value) if unit == "s" else f"{value:g} {unit}"


def _grid(rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append((indent + "  ".join(cells)).rstrip())
    return lines


def render_machine(machine: Mapping[str, Scalar]) -> str:
    cores = f"{machine['cores']} cores"
    if machine.get("usable_cores") not in (None, machine["cores"]):
        cores += f" ({machine['usable_cores']} usable)"
    return "\n".join(
        [
            f"machine: {machine['cpu']}, {cores}, {machine['memory_gib']} GiB memory,"
            f" {machine['os']}",
            f"software: {machine['python']}, SQLite {machine['sqlite']},"
            f" SQLAlchemy {machine['sqlalchemy']}, fswatch_sync {machine['fswatch_sync']}"
            + (f" ({machine['commit']})" if machine.get("commit") else ""),
        ]
    )


def render_result(result: Result, *, quick: bool) -> str:
    lines = [f"{result.entry}: {result.title}"]
    if result.sizes:
        lines.append(
            "  sizes: "
            + ", ".join(
                f"{key}={value:,}"
                if isinstance(value, int) and not isinstance(value, bool)
                else f"{key}={value}"
                for key, value in result.sizes.items()
            )
        )
    rows = [["contestant", "median", "min", "max", "runs"]]
    for item in result.contestants:
        rows.append(
            [
                item.name,
                format_value(item.median, item.unit),
                format_value(min(item.samples), item.unit) if item.samples else "-",
                format_value(max(item.samples), item.unit) if item.samples else "-",
                str(len(item.samples)),
            ]
        )
    lines += _grid(rows)
    if result.ratios:
        rows = [["ratio of medians", "value", "target", "met"]]
        for ratio in result.ratios:
            met = ratio.met
            rows.append(
                [
                    ratio.label,
                    f"{ratio.value:.2f}x",
                    str(ratio.target) if ratio.target else "-",
                    "-" if met is None else ("yes" if met else "NO"),
                ]
            )
        lines.append("")
        lines += _grid(rows)
        if quick:
            lines.append("  (quick mode: small sizes, targets not judged)")
    if result.figures:
        rows = [["figure", "value", "target", "met"]]
        for figure in result.figures:
            met = figure.met
            rows.append(
                [
                    figure.label,
                    format_value(figure.value, figure.unit),
                    figure.target.describe(figure.unit) if figure.target else "-",
                    "-" if met is None else ("yes" if met else "NO"),
                ]
            )
        lines.append("")
        lines += _grid(rows)
        if quick and not result.ratios:
            lines.append("  (quick mode: small sizes, targets not judged)")
    lines.append(
        "  outcome: "
        + ("identical for every contestant" if result.ok else "CONTESTANTS DISAGREE (see notes)")
    )
    lines += [f"  note: {note}" for note in result.notes]
    return "\n".join(lines)


def write_json(out: Path, payload: Mapping[str, Any], name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def stderr_log(message: str) -> None:
    sys.stderr.write(f"[bench] {message}\n")
    sys.stderr.flush()
