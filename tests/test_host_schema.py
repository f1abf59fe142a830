"""A host's own schema, mapped through [schema]: swept correctly on every backend, never altered."""

from __future__ import annotations

import io
import json
import logging
import tomllib
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hostlike import (
    ABORTED,
    BLOCKED,
    CANCEL_MESSAGE,
    EXPECTED_STATES,
    NULLIFIED_AND_DELETED,
    PURGED,
    SLUG,
    TAGGED,
    WORKING,
    app_artifacts,
    app_bundles,
    app_notes,
    app_tags,
    apps,
    build_scenario,
    create_host_schema,
    job_states,
    jobs,
    naive,
    rows,
    schema_snapshot,
    schema_toml,
    table_names,
    write_config,
)
from sqlalchemy.engine import Engine

from fswatch_sync import cli, rules
from fswatch_sync.errors import SettingsError
from fswatch_sync.hostschema import reflect_host_tables
from fswatch_sync.layout import AppKey
from fswatch_sync.schema import journal_table
from fswatch_sync.schemaconfig import SchemaConfig
from fswatch_sync.settings import Settings, load_settings
from fswatch_sync.store import Store
from fswatch_sync.sweep import Sweeper


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """The CLI configures the package logger; put it back for the next test."""
    logger = logging.getLogger("fswatch_sync")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def _settings(tmp_path: Path, apps_root: Path, database_url: str, **extra: Any) -> Settings:
    config = write_config(tmp_path / "host.toml", root=apps_root, database_url=database_url,
                          **extra)
    return load_settings(environ={}, config_path=config)


def _everything(engine: Engine) -> dict[str, Any]:
    """All host rows and the journal, for "nothing changed" comparisons."""
    state: dict[str, Any] = {
        table.name: rows(engine, table, "pk" if table in (apps, jobs) else "id")
        for table in (apps, jobs, app_artifacts, app_bundles, app_notes, app_tags)
    }
    with engine.connect() as connection:
        state["journal"] = connection.execute(sa.select(sa.func.count()).select_from(
            journal_table)).scalar_one()
    return state


def _journal(engine: Engine, **where: Any) -> list[dict[str, Any]]:
    with engine.connect() as connection:
        found = connection.execute(
            sa.select(journal_table)
            .where(*(journal_table.c[k] == v for k, v in where.items()))
            .order_by(journal_table.c.id)
        ).all()
    return [dict(row._mapping) for row in found]


def test_mapped_schema_swept_exactly_and_never_altered(
    engine: Engine, database_url: str, apps_root: Path, tmp_path: Path, now: datetime,
    keep_logging: None,
) -> None:
    create_host_schema(engine)
    settings = _settings(tmp_path, apps_root, database_url)
    assert settings.schema.manage_host_tables is False
    host_tables_before = table_names(engine)
    shape_before = schema_snapshot(engine)

    # init-db with a mapped schema creates the tool's tables only.
    out = io.StringIO()
    assert cli.main(["init-db", "--config", str(tmp_path / "host.toml")], out=out) == 0
    created = table_names(engine) - host_tables_before
    assert created and all(name.startswith("fswatch_sync_") for name in created)
    assert schema_snapshot(engine) == shape_before

    scenario = build_scenario(engine, apps_root, now)
    before = _everything(engine)
    app2_jobs_before = {
        pk: row for pk, row in before["jobs"].items() if row["app_no"] == BLOCKED
    }
    store = Store(engine, settings.schema, batch_size=settings.batch_size)
    sweeper = Sweeper(store, settings, instance_id="test-host")

    dry = sweeper.run(now=now, dry_run=True)
    assert _everything(engine) == before, "a dry run changed something"

    real = sweeper.run(now=now)
    expected = {"orphan_apps": 2, "orphan_tasks": 3, "stuck_tasks": 2, "old_tasks": 6,
                "blocked_apps": 1}
    assert real.counts() == expected
    assert dry.counts() == expected, "dry run must report what the real run did"
    assert (real.stuck_running, real.stuck_pending) == (1, 1)

    after = rows(engine, apps, "pk")
    assert {row["num"] for row in after.values()} == {1, 2, 5, 6, 7, 8}
    # restrict: the blocked app's row, its dependent and its tasks are exactly as they were.
    assert after[scenario.app_pk[BLOCKED]] == before["apps"][scenario.app_pk[BLOCKED]]
    assert set(rows(engine, app_artifacts)) == {scenario.artifact}
    jobs_after = rows(engine, jobs, "pk")
    assert {pk: jobs_after[pk] for pk in app2_jobs_before} == app2_jobs_before
    assert not _journal(engine, model_slug=SLUG, app_number=BLOCKED)

    # delete: dependents gone, journalled with before-images, in the removal's batch.
    assert rows(engine, app_bundles) == {}
    removed_entry = _journal(engine, action="app_removed", app_number=NULLIFIED_AND_DELETED)
    assert len(removed_entry) == 1
    batch = removed_entry[0]["batch_id"]
    deleted = _journal(engine, action="dependent_deleted", table_name="app_bundles")
    assert [json.loads(e["before_image"]) for e in deleted] == [
        before["app_bundles"][pk] for pk in scenario.bundles
    ]
    assert {e["batch_id"] for e in deleted} == {batch}
    app3_image = json.loads(removed_entry[0]["before_image"])
    assert app3_image["owner_email"] == f"{SLUG}-3@host.test"

    # nullify: pointer NULL, the rest of the row kept, journalled.
    notes = rows(engine, app_notes)
    assert notes[scenario.note]["app_id"] is None
    assert notes[scenario.note]["body"] == "keep me"
    assert notes[scenario.kept_note]["app_id"] == scenario.app_pk[1]
    nullified = _journal(engine, action="dependent_nullified")
    assert len(nullified) == 1 and nullified[0]["batch_id"] == batch
    assert json.loads(nullified[0]["before_image"])["app_id"] == scenario.app_pk[3]

    # An FK the config does not name (app_tags.app_ref) got dependents_policy = delete.
    assert rows(engine, app_tags) == {}
    tag_entries = _journal(engine, action="dependent_deleted", table_name="app_tags")
    assert [json.loads(e["before_image"])["id"] for e in tag_entries] == [scenario.tag]
    assert tag_entries[0]["app_number"] == TAGGED

    # Tasks: extra active cancelled for removed apps, extra terminal purged when old, parents
    # kept while a child is kept.
    assert job_states(engine) == EXPECTED_STATES
    assert not PURGED & set(job_states(engine))
    cancelled = jobs_after[scenario.job_pk["a3-queued"]]
    assert cancelled["note"] == CANCEL_MESSAGE.format(model_slug=SLUG, app_number=3)
    assert cancelled["ended_at"] == naive(now)
    assert cancelled["priority"] == before["jobs"][scenario.job_pk["a3-queued"]]["priority"]
    assert jobs_after[scenario.job_pk["a3-skipped"]] == before["jobs"][
        scenario.job_pk["a3-skipped"]
    ], "terminal tasks of a removed app are left as they are"
    assert len(_journal(engine, action="task_purged")) == 6

    # The host's tables were never created or altered by the sweep.
    assert schema_snapshot(engine) == shape_before

    # Idempotent: the next sweep has nothing to do but still reports the blocked app.
    again = Sweeper(store, settings, instance_id="test-host").run(now=now)
    assert again.counts() == {"orphan_apps": 0, "orphan_tasks": 0, "stuck_tasks": 0,
                              "old_tasks": 0, "blocked_apps": 1}


def test_old_task_count_equals_purge_with_sub_tasks_and_small_batches(
    engine: Engine, database_url: str, apps_root: Path, tmp_path: Path, now: datetime
) -> None:
    create_host_schema(engine)
    settings = _settings(tmp_path, apps_root, database_url)
    build_scenario(engine, apps_root, now)
    store = Store(engine, settings.schema, batch_size=2, max_transaction_ms=0.001)
    store.ensure_tool_tables()
    rule = rules.old_tasks_rule(store.host, now - timedelta(days=30))
    with store.rehearsal() as rehearsal:
        counted = rehearsal.apply_task_rule(rule, source="test", now=now).count
    before = set(job_states(engine))
    purged = store.apply_task_rule(rule, source="test", now=now).count
    assert counted == purged == len(PURGED)
    assert before - set(job_states(engine)) == PURGED
    assert store.apply_task_rule(rule, source="test", now=now).count == 0
    # Batches of at most two rows, parents in a later batch than their children.
    entries = _journal(engine, action="task_purged")
    per_batch: dict[str, int] = {}
    for entry in entries:
        per_batch[entry["batch_id"]] = per_batch.get(entry["batch_id"], 0) + 1
    assert max(per_batch.values()) <= 2 and len(per_batch) >= 3
    order = [json.loads(e["before_image"])["job_uid"] for e in entries]
    assert order.index("p1") > max(order.index("c1a"), order.index("c1b"))


@pytest.mark.parametrize(("configured", "expected"), [(None, "restrict"), ("nullify", "nullify")])
def test_undeclared_foreign_key_gets_dependents_policy(
    engine: Engine, configured: str | None, expected: str
) -> None:
    create_host_schema(engine)
    with engine.begin() as connection:  # nullify needs a nullable pointer
        connection.execute(sa.text("DROP TABLE app_tags"))
        connection.execute(sa.text(
            "CREATE TABLE app_tags (id INTEGER PRIMARY KEY, app_ref INTEGER NULL,"
            " tag VARCHAR(50) NOT NULL, CONSTRAINT fk_tags_app FOREIGN KEY (app_ref)"
            " REFERENCES apps (pk))"
        ))
    config = SchemaConfig.from_mapping(tomllib.loads(schema_toml(configured))["schema"])
    host = reflect_host_tables(engine, config)
    policies = {d.name: d.policy for d in host.dependents}
    assert policies == {
        "app_artifacts.app_id": "restrict",
        "app_bundles.app_id": "delete",
        "app_notes.app_id": "nullify",
        "app_tags.app_ref": expected,
    }
    assert host.parent_col is not None and host.parent_col.name == "parent_pk"


def test_restrict_blocks_removal_from_the_reactor_path_too(
    engine: Engine, database_url: str, apps_root: Path, tmp_path: Path, now: datetime
) -> None:
    create_host_schema(engine)
    settings = _settings(tmp_path, apps_root, database_url)
    scenario = build_scenario(engine, apps_root, now)
    store = Store(engine, settings.schema)
    store.ensure_tool_tables()
    before = rows(engine, jobs, "pk")
    outcome = store.remove_apps(
        [AppKey(SLUG, BLOCKED), AppKey(SLUG, TAGGED)], source="reactor", now=now
    )
    assert outcome.blocked == [AppKey(SLUG, BLOCKED)]
    assert outcome.removed == [AppKey(SLUG, TAGGED)]
    assert outcome.dependents_deleted == 1
    assert scenario.app_pk[BLOCKED] in rows(engine, apps, "pk")
    after = rows(engine, jobs, "pk")
    assert {pk: r for pk, r in after.items() if r["app_no"] == BLOCKED} == {
        pk: r for pk, r in before.items() if r["app_no"] == BLOCKED
    }
    assert after[scenario.job_pk["a2-working"]]["state"] == WORKING
    assert ABORTED not in {r["state"] for r in after.values() if r["app_no"] == BLOCKED}


def test_composite_foreign_keys_and_rows_pointing_at_tasks(
    engine: Engine, database_url: str, apps_root: Path, tmp_path: Path, now: datetime
) -> None:
    """A composite FK to the apps table gets dependents_policy; a task some other row points at
    is kept by the purge (which would otherwise fail on that key every time)."""
    create_host_schema(engine)
    with engine.begin() as connection:
        connection.execute(sa.text(
            "CREATE TABLE app_files (id INTEGER PRIMARY KEY, slug VARCHAR(200) NOT NULL,"
            " num INTEGER NOT NULL, name VARCHAR(50) NOT NULL, CONSTRAINT fk_files_app"
            " FOREIGN KEY (slug, num) REFERENCES apps (slug, num))"
        ))
        connection.execute(sa.text(
            "CREATE TABLE job_results (id INTEGER PRIMARY KEY, job_pk INTEGER NOT NULL,"
            " CONSTRAINT fk_results_job FOREIGN KEY (job_pk) REFERENCES jobs (pk))"
        ))
    settings = _settings(tmp_path, apps_root, database_url)
    scenario = build_scenario(engine, apps_root, now)
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO app_files (id, slug, num, name) VALUES (1, :s, :n, 'index.html'),"
            " (2, :s, 1, 'kept.html')"
        ), {"s": SLUG, "n": TAGGED})
        connection.execute(sa.text(
            "INSERT INTO job_results (id, job_pk) VALUES (1, :a), (2, :b)"
        ), {"a": scenario.job_pk["old-done"], "b": scenario.job_pk["c1a"]})
    store = Store(engine, settings.schema, batch_size=3)
    store.ensure_tool_tables()
    assert {d.name: d.policy for d in store.host.dependents}["app_files.slug+num"] == "delete"

    dry = Sweeper(store, settings, instance_id="test").run(now=now, dry_run=True)
    real = Sweeper(store, settings, instance_id="test").run(now=now)
    assert real.counts() == dry.counts() == {
        "orphan_apps": 2, "orphan_tasks": 3, "stuck_tasks": 2, "old_tasks": 3, "blocked_apps": 1,
    }
    with engine.connect() as connection:
        files = connection.execute(sa.text("SELECT id FROM app_files")).scalars().all()
    assert list(files) == [2]
    entry = _journal(engine, action="dependent_deleted", table_name="app_files")
    assert len(entry) == 1 and json.loads(entry[0]["before_image"])["name"] == "index.html"
    # old-done and c1a are pointed at, so they (and c1a's parent p1) stay; c1b goes.
    assert set(job_states(engine)) == set(EXPECTED_STATES) | {"old-done", "c1a", "p1"}


@pytest.mark.parametrize("template", ["gone: {model}", "gone: {0}", "gone: {app_number:q}", "{"])
def test_a_cancel_message_that_cannot_be_formatted_is_a_settings_error(template: str) -> None:
    with pytest.raises(SettingsError, match=r"schema\.cancel_message"):
        SchemaConfig.from_mapping({"cancel_message": template})


def test_a_good_cancel_message_is_accepted() -> None:
    config = SchemaConfig.from_mapping({"cancel_message": "{model_slug}/app{app_number:d} gone"})
    assert config.cancel_message == "{model_slug}/app{app_number:d} gone"
