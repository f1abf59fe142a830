"""Issue 5, item 1 — crash: the quick rounds of ``crash-kill9`` (the long ones run from
``scripts/reliability``), and proof that the harness's checks and report do what they claim."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import faults.crash  # noqa: F401  (registers the scenario)
import pytest
import sqlalchemy as sa
from faults import harness
from faults.crash import daemon_settings
from faults.daemon import Daemon, init_db
from faults.servers import probe_engine
from faults.world import APPS, TASKS, World

from fswatch_sync import db
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import leases_table
from fswatch_sync.store import Store


def test_crash_kill9_quick_rounds(backend: str, tmp_path: Path) -> None:
    result = harness.run_quick_in_pytest("crash-kill9", backend, tmp_path)
    assert result.passed, f"{result.key}: {result.details}"


def test_a_killed_sweepers_lease_delays_the_restarts_sweep_but_never_cancels_it(
    tmp_path: Path,
) -> None:
    """What kill -9 during a sweep leaves behind, made certain: the lease row of a dead holder.
    The restarted daemon is refused the lease for its start-up sweep and must sweep once the
    lease expires (found by crash-kill9: the skipped sweep used to wait for the next period)."""
    url = f"sqlite:///{tmp_path / 'lease.db'}"
    init_db(url)
    root = tmp_path / "generated" / "apps"
    root.mkdir(parents=True)
    engine = probe_engine(url)
    world = World(root, engine, tmp_path / "trash")
    world.seed(world.new_keys(["m1", "m2"], 3))
    world.remove_app(AppKey("m1", 2))  # while the daemon was down
    now = db.utcnow().replace(tzinfo=None)
    with engine.begin() as connection:
        connection.execute(sa.insert(leases_table).values(
            name="sweep", holder="killed-host-4242-0badc0de", acquired_at=now,
            expires_at=now + timedelta(seconds=2),
        ))
    daemon = Daemon(tmp_path, {**daemon_settings(root, url), "FSWATCH_SYNC_LEASE_SECONDS": "2"})
    try:
        daemon.start()
        daemon.wait_ready(engine, timeout=30)
        assert "skipped: another instance is sweeping" in daemon.log_text()
        tally = world.check(world.snapshot(), settled=True)
        assert tally.handled == 1
        assert daemon.stop() == 0
    finally:
        daemon.close()
        engine.dispose()


# -- the invariant checker must see what it is there to see --------------------------------------


@pytest.fixture
def world(tmp_path: Path) -> World:
    url = f"sqlite:///{tmp_path / 'check.db'}"
    engine = db.create_engine(url)
    Store(engine).init_db()
    engine.dispose()
    root = tmp_path / "apps"
    root.mkdir()
    built = World(root, probe_engine(url), tmp_path / "trash")
    built.seed(built.new_keys(["m1", "m2"], 2))
    return built


def _remove_properly(world: World, key: AppKey) -> None:
    engine = db.create_engine(str(world.engine.url))
    try:
        Store(engine).remove_apps([key], source="reactor", now=db.utcnow())
    finally:
        engine.dispose()


def test_world_counts_handled_and_untouched(world: World) -> None:
    key = AppKey("m1", 1)
    world.remove_app(key)
    tally = world.check(world.snapshot())
    assert (tally.handled, tally.untouched, tally.waiting) == (0, 3, 1)
    with pytest.raises(AssertionError, match="directory gone but its row is still there"):
        world.check(world.snapshot(), settled=True)
    _remove_properly(world, key)
    tally = world.check(world.snapshot(), settled=True)
    assert (tally.handled, tally.untouched, tally.waiting) == (1, 3, 0)


def test_world_catches_a_half_done_removal(world: World) -> None:
    key = AppKey("m1", 1)
    world.remove_app(key)
    _remove_properly(world, key)
    with world.engine.begin() as connection:
        connection.execute(
            sa.update(TASKS).where(TASKS.c.task_id == "m1-1-p").values(status="pending")
        )
    with pytest.raises(AssertionError, match="HALF-DONE"):
        world.check(world.snapshot())


def test_world_catches_an_unjournalled_or_wrong_removal(world: World) -> None:
    world.remove_app(AppKey("m1", 2))
    with world.engine.begin() as connection:
        for slug, number in (("m1", 2), ("m2", 1)):
            connection.execute(
                sa.delete(APPS).where(APPS.c.model_slug == slug, APPS.c.app_number == number)
            )
    with pytest.raises(AssertionError) as caught:
        world.check(world.snapshot())
    assert "m1/app2: row gone with 0 app_removed journal entries" in str(caught.value)
    assert "m2/app1: WRONG REMOVAL" in str(caught.value)


def test_world_catches_a_task_touched_while_its_app_stays(world: World) -> None:
    with world.engine.begin() as connection:
        connection.execute(
            sa.update(TASKS).where(TASKS.c.task_id == "m2-2-r").values(status="cancelled")
        )
    with pytest.raises(AssertionError, match="changed while the app kept its row"):
        world.check(world.snapshot())


# -- the result format and the report -------------------------------------------------------------


def test_result_round_trip_and_validation(tmp_path: Path) -> None:
    result = harness.Result("demo", 3, "pass", "ok", 7, "sqlite", 1.25, mode="quick")
    path = result.write(tmp_path)
    assert path.name == "demo.sqlite.json"
    data = json.loads(path.read_text())
    assert list(data)[:7] == list(harness.RESULT_KEYS)
    assert harness.Result.from_json(data) == result
    with pytest.raises(ValueError, match="outcome"):
        harness.Result.from_json({**data, "outcome": "maybe"})
    with pytest.raises(ValueError, match="missing"):
        harness.Result.from_json({"scenario": "x"})


def test_execute_records_a_failure_with_its_seed(tmp_path: Path) -> None:
    def broken(run: harness.Run) -> str:
        raise AssertionError(f"invariant broken in round {run.rng().randint(1, run.rounds)}")

    harness.scenario("selftest-broken", quick=2, long=5, summary="always fails")(broken)
    try:
        result = harness.execute("selftest-broken", seed=11, workdir=tmp_path,
                                 results_dir=tmp_path / "results")
    finally:
        del harness.REGISTRY["selftest-broken"]
    assert (result.outcome, result.rounds, result.seed) == ("fail", 2, 11)
    assert "invariant broken in round" in result.details and "seed 11" in result.details
    assert (tmp_path / "results" / "selftest-broken.json").exists()
    assert "AssertionError" in (tmp_path / "results" / "selftest-broken.trace.txt").read_text()


def test_report_is_rendered_from_results(tmp_path: Path) -> None:
    scenarios = harness.load_all()
    assert "crash-kill9.sqlite" in scenarios and "crash-kill9.postgres" in scenarios
    harness.Result("crash-kill9", 150, "pass", "a | b", 5, "sqlite", 95.0, mode="long",
                   command="scripts/reliability").write(tmp_path)
    (tmp_path / "junk.json").write_text("[]")
    found, problems = harness.load_results(tmp_path)
    text = harness.render_report(
        found, scenarios=scenarios, generated_at=datetime(2026, 1, 2, tzinfo=UTC),
        command="scripts/reliability", problems=problems,
    )
    assert "| crash-kill9 | sqlite | 150 | **pass** | 5 | 1.6 min | a \\| b |" in text
    assert "| crash-kill9 | postgres | - | not run |" in text
    assert "junk.json" in text
    assert "2026-01-02T00:00:00+00:00" in text
