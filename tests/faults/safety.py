"""Issue 11 — names and a poison row, against ``fswatch-sync run`` as a process.

**legal-names**: model directories called ``~user``, ``~``, ``a\\b``, ``new\\nline``, ``with
space`` and ``tab\\tname``, next to an ordinary one. The start-up sweep and a SIGHUP sweep must
remove nothing (their apps are present); removing one app of each (``rm -rf``, moved out,
renamed) must be applied by the reactor; no line of the daemon's log may begin with the text
after a newline in a slug (a forged line).

**poison-row**: the host refuses, by a constraint of its own, to cancel the tasks of one app.
That app and a burst of ordinary ones are removed together: every ordinary one must be handled
while the bad one is refused (retried alone, its row and tasks untouched); once the host drops
its constraint, the bad one is handled too at its next retry. World's invariants hold for every
app throughout: each fully handled or untouched, never half.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from helpers import wait_until

from faults.crash import daemon_settings
from faults.daemon import Daemon
from faults.harness import Run, scenario
from faults.kit import clear_rows, prepare_database
from faults.servers import probe_engine, scratch_database
from faults.world import World
from fswatch_sync.layout import AppKey

LEGAL_SLUGS = ("~user", "~", "a\\b", "new\nline", "with space", "tab\tname")
# What a forged log line would begin with: the text after the control character in a slug.
FORGED_STARTS = ("line/app", "name/app")
PLAIN_SLUG = "openai_gpt-4"
SETTLE_SECONDS = 30.0


def _settled(world: World) -> bool:
    try:
        world.check(world.snapshot(), settled=True)
    except AssertionError:
        return False
    return True


def _round_legal_names(url: str, workdir: Path, run: Run, index: int) -> int:
    rng = run.rng()
    root = workdir / f"round{index}" / "generated" / "apps"
    root.mkdir(parents=True)
    engine = probe_engine(url)
    clear_rows(engine)
    daemon = Daemon(workdir, daemon_settings(root, url), name=f"names{index}")
    try:
        world = World(root, engine, workdir / f"round{index}" / "trash")
        world.seed(world.new_keys((*LEGAL_SLUGS, PLAIN_SLUG), 3))
        daemon.start()
        daemon.wait_ready(engine)
        tally = world.check(world.snapshot(), settled=True)
        assert tally.handled == 0, f"the start-up sweep removed {sorted(tally.handled_keys)}"
        gone = []
        for slug in LEGAL_SLUGS:
            key = rng.choice([k for k in world.alive() if k.model_slug == slug])
            world.remove_app(key, rng.choice(("rmtree", "move", "rename")))
            gone.append(key)
        wait_until(lambda: _settled(world), SETTLE_SECONDS, "the reactor's removals",
                   on_timeout=daemon.log_tail)
        sweeps = len(daemon.sweeps(engine))
        daemon.hup()
        wait_until(lambda: len([s for s in daemon.sweeps(engine) if s["finished_at"]]) > sweeps,
                   SETTLE_SECONDS, "the SIGHUP sweep", on_timeout=daemon.log_tail)
        tally = world.check(world.snapshot(), settled=True)
        assert tally.handled_keys == set(gone), sorted(tally.handled_keys ^ set(gone))
        assert daemon.stop() == 0, daemon.log_tail()
        forged = [
            line for line in daemon.log_text().splitlines() if line.startswith(FORGED_STARTS)
        ]
        assert not forged, f"forged log lines: {forged[:3]}"
        return len(gone)
    finally:
        daemon.close()
        engine.dispose()


@scenario(
    "legal-names",
    backends=("sqlite", "postgres", "mysql"),
    quick=1,
    long=5,
    summary="model directories named ~user, ~, a\\b, new<LF>line, 'with space', tab<TAB>name"
    " beside an ordinary one under a running daemon: the start-up and a SIGHUP sweep remove"
    " nothing; one app of each removed (rm -rf, moved out, renamed) is handled by the reactor;"
    " no daemon log line is forged by a newline in a slug",
    timeout_s=600,
)
def legal_names(run: Run) -> str:
    assert run.backend is not None
    handled = 0
    with scratch_database(run.backend, run.workdir) as url:
        prepare_database(url)
        for index in range(run.rounds):
            handled += _round_legal_names(url, run.workdir, run, index)
    return (
        f"{run.rounds} round(s): {len(LEGAL_SLUGS)} legal names kept by every sweep, {handled}"
        " removals under them applied, 0 wrong removals, 0 forged log lines"
    )


POISON_NUMBER = 666
POISON_CHECK = "ck_fswatch_fault_poison"
POISON_TRIGGER = "tr_fswatch_fault_poison"


def _poison(engine: sa.Engine) -> None:
    """The host's refusal: cancelling a task of app 666 fails (a CHECK; a trigger on SQLite,
    which cannot add a constraint to an existing table)."""
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql(
                f"CREATE TRIGGER {POISON_TRIGGER} BEFORE UPDATE ON analysis_tasks"
                f" WHEN NEW.status = 'cancelled' AND NEW.target_app_number = {POISON_NUMBER}"
                " BEGIN SELECT RAISE(ABORT, 'the host refuses'); END"
            )
        else:
            connection.exec_driver_sql(
                f"ALTER TABLE analysis_tasks ADD CONSTRAINT {POISON_CHECK}"
                f" CHECK (status <> 'cancelled' OR target_app_number <> {POISON_NUMBER})"
            )


def _cure(engine: sa.Engine) -> None:
    with engine.begin() as connection:
        if engine.dialect.name == "sqlite":
            connection.exec_driver_sql(f"DROP TRIGGER {POISON_TRIGGER}")
        else:
            connection.exec_driver_sql(
                f"ALTER TABLE analysis_tasks DROP CONSTRAINT {POISON_CHECK}"
            )


def _round_poison(url: str, workdir: Path, run: Run, index: int) -> int:
    rng = run.rng()
    root = workdir / f"round{index}" / "generated" / "apps"
    root.mkdir(parents=True)
    engine = probe_engine(url)
    clear_rows(engine)
    daemon = Daemon(workdir, daemon_settings(root, url), name=f"poison{index}")
    try:
        world = World(root, engine, workdir / f"round{index}" / "trash")
        world.seed(world.new_keys(("openai_gpt-4", "mistral_7b"), 12))
        bad = AppKey("openai_gpt-4", POISON_NUMBER)
        world.seed([bad])
        _poison(engine)
        daemon.start()
        daemon.wait_ready(engine)
        burst = rng.sample([k for k in world.alive() if k != bad], 8)
        world.remove_app(bad)
        for key in burst:
            world.remove_app(key, rng.choice(("rmtree", "move", "rename")))

        def others_handled() -> bool:
            tally = world.check(world.snapshot())
            return tally.handled_keys == set(burst) and tally.waiting == 1

        wait_until(others_handled, SETTLE_SECONDS, "every removal but the refused one",
                   on_timeout=daemon.log_tail)
        # The refused one keeps being retried, alone, and stays untouched meanwhile.
        tally = world.check(world.snapshot())
        assert bad not in tally.handled_keys
        _cure(engine)
        wait_until(lambda: _settled(world), SETTLE_SECONDS, "the refused one, once cured",
                   on_timeout=daemon.log_tail)
        assert daemon.stop() == 0, daemon.log_tail()
        return len(burst)
    finally:
        daemon.close()
        engine.dispose()


@scenario(
    "poison-row",
    backends=("sqlite", "postgres", "mysql"),
    quick=1,
    long=5,
    summary="the host refuses (a CHECK constraint; a trigger on SQLite) to cancel the tasks of"
    " one app; it and 8 ordinary apps are removed in one burst under a running daemon: the 8"
    " are handled while the bad one is retried alone and stays untouched; once the host drops"
    " its refusal the bad one is handled at its next retry; every app fully handled or"
    " untouched throughout",
    timeout_s=600,
)
def poison_row(run: Run) -> str:
    assert run.backend is not None
    handled = 0
    with scratch_database(run.backend, run.workdir) as url:
        prepare_database(url)
        for index in range(run.rounds):
            handled += _round_poison(url, run.workdir, run, index)
    return (
        f"{run.rounds} round(s): {handled} ordinary removals applied while one was refused,"
        " the refused one applied once cured, 0 wrong removals"
    )
