"""The rules as data, without a database: each predicate compiled for the three dialects, the
plan of a sweep (which rules, in which order, with which effects), the orphan comparison and the
guard, the adaptive batch, and the journal images read back from every backend's rendering."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite

from fswatch_sync import db, images, rules, signals
from fswatch_sync.batching import BatchSizer
from fswatch_sync.defaulttables import default_host_metadata
from fswatch_sync.hostschema import HostTables, ResolvedDependent
from fswatch_sync.layout import AppKey
from fswatch_sync.outcomes import AppRow
from fswatch_sync.schemaconfig import SchemaConfig
from fswatch_sync.settings import Settings
from fswatch_sync.sweep_plan import guard, orphan_keys

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
DIALECTS: dict[str, sa.Dialect] = {
    "sqlite": sqlite.dialect(),
    "postgresql": postgresql.dialect(),  # type: ignore[no-untyped-call]
    "mysql": mysql.dialect(),
}


def default_host(**config: object) -> HostTables:
    schema = SchemaConfig(**config)  # type: ignore[arg-type]
    metadata = default_host_metadata(schema)
    return HostTables(
        apps=metadata.tables[schema.apps_table],
        tasks=metadata.tables[schema.tasks_table],
        dependents=(),
        config=schema,
    )


def sql(expression: sa.ClauseElement, dialect: str = "sqlite") -> str:
    compiled = expression.compile(
        dialect=DIALECTS[dialect], compile_kwargs={"literal_binds": True}
    )
    return " ".join(str(compiled).split())


def test_an_orphan_task_is_active_with_no_row_for_its_key() -> None:
    text = sql(rules.orphan_task(default_host()))
    assert "analysis_tasks.status IN ('pending', 'running')" in text
    assert "NOT (EXISTS (SELECT" in text
    assert "generated_applications.model_slug = analysis_tasks.target_model" in text
    assert "generated_applications.app_number = analysis_tasks.target_app_number" in text


def test_stuck_and_old_tasks_are_aged_by_the_documented_columns() -> None:
    host = default_host()
    running = sql(rules.stuck_running(host, NOW - timedelta(hours=1)))
    assert "status = 'running'" in running
    started = "coalesce(analysis_tasks.started_at, analysis_tasks.created_at)"
    assert f"{started} < '2026-06-01 11:00:00" in running
    pending = sql(rules.stuck_pending(host, NOW - timedelta(hours=1)))
    assert "status = 'pending'" in pending and "created_at < '2026-06-01 11:00:00" in pending
    old = sql(rules.old_task(host, NOW - timedelta(days=30)))
    finished = (
        "coalesce(analysis_tasks.completed_at, analysis_tasks.started_at,"
        " analysis_tasks.created_at)"
    )
    assert f"{finished} IS NOT NULL" in old, "a task with no timestamp is never old"
    assert f"{finished} < '2026-05-02 12:00:00" in old
    assert "status IN ('completed', 'failed', 'cancelled')" in old


def test_the_grace_protects_a_key_while_its_youngest_row_is_young() -> None:
    host = default_host()
    rows = sa.select(host.app_col("id")).where(rules.young_key(host, NOW - timedelta(minutes=10)))
    text = sql(rows)
    # Any row of the same key (a sibling, versions included) younger than the grace.
    assert "EXISTS (SELECT 1 FROM generated_applications AS sibling WHERE" in text
    assert "sibling.model_slug = generated_applications.model_slug" in text
    assert "sibling.app_number = generated_applications.app_number" in text
    assert "sibling.created_at > '2026-06-01 11:50:00" in text
    assert "OFFSET" not in text
    # PostgreSQL is kept from joining it (tests/test_plans.py shows the plan).
    assert "LIMIT ALL OFFSET 0)" in sql(rows, "postgresql")
    # The app rule excludes such keys: NOT EXISTS, also where booleans are integers.
    keys = [AppKey("m", 1)]
    for dialect in ("sqlite", "mysql", "postgresql"):
        rule = sql(
            sa.select(host.app_col("id")).where(
                rules.app_rule(host, keys, NOW - timedelta(minutes=10))
            ),
            dialect,
        )
        assert "AND NOT (EXISTS (SELECT 1 FROM generated_applications AS sibling" in rule, rule
        assert not rule.endswith(("= 0", "= 1")), rule


def test_times_are_bound_as_the_column_holds_them() -> None:
    naive = sa.Column("t", sa.DateTime())
    aware = sa.Column("t", sa.DateTime(timezone=True))
    eastern = NOW.astimezone(__import__("zoneinfo").ZoneInfo("America/New_York"))
    assert db.bind_time(naive, eastern) == datetime(2026, 6, 1, 12, 0)
    assert db.bind_time(aware, eastern) == NOW and db.bind_time(aware, eastern).tzinfo == UTC
    assert db.bind_time(aware, datetime(2026, 6, 1, 12, 0)) == NOW


def test_purgeable_keeps_what_a_restrict_table_holds_and_parents_of_children() -> None:
    metadata = sa.MetaData()
    tasks = sa.Table(
        "jobs", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("task_id", sa.String(50)),
        sa.Column("parent", sa.String(50)),
        *(sa.Column(c, sa.String(50)) for c in ("target_model", "status", "error_message")),
        sa.Column("target_app_number", sa.Integer),
        *(sa.Column(c, sa.DateTime()) for c in ("created_at", "started_at", "completed_at")),
    )
    results = sa.Table(
        "results", metadata, sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer),
    )
    apps = default_host_metadata(SchemaConfig()).tables["generated_applications"]
    config = SchemaConfig(tasks_table="jobs")
    config = SchemaConfig(
        tasks_table="jobs",
        tasks=type(config.tasks)(parent_id="parent"),
    )
    host = HostTables(
        apps=apps, tasks=tasks, dependents=(), config=config, parent_target="task_id",
        task_dependents=(
            ResolvedDependent(results, (results.c.job_id,), (tasks.c.id,), "restrict"),
        ),
    )
    where, kept = rules.purgeable(host, NOW)
    # Inside the statement that applies it, as the store does: the subqueries correlate.
    text = sql(sa.select(tasks.c.id).where(where))
    assert (
        "NOT (EXISTS (SELECT * FROM results AS referrer_results"
        " WHERE referrer_results.job_id = jobs.id))"
    ) in text
    # A sub-task points at its parent's task_id, read from the foreign key, not at the pk.
    assert "NOT (EXISTS (SELECT * FROM jobs AS child WHERE child.parent = jobs.task_id))" in text
    assert "EXISTS (SELECT * FROM results AS referrer_results" in sql(
        sa.select(tasks.c.id).where(kept)
    )


def test_the_cancel_message_is_built_by_the_database_and_capped() -> None:
    host = default_host(cancel_message="gone: {model_slug}/app{app_number}")
    text = sql(rules.key_message(host.config.cancel_message, host))
    assert text.startswith("substr(")
    assert "'gone: ' || CAST(analysis_tasks.target_model AS VARCHAR)" in text
    assert f", 1, {rules.MAX_MESSAGE_LENGTH})" in text


@pytest.mark.parametrize(
    ("switches", "expected"),
    [
        ({}, ["orphan_tasks", "stuck_running", "stuck_pending", "old_tasks"]),
        ({"cleanup_orphan_tasks": False}, ["stuck_running", "stuck_pending", "old_tasks"]),
        ({"cleanup_stuck_tasks": False}, ["orphan_tasks", "old_tasks"]),
        ({"cleanup_old_tasks": False}, ["orphan_tasks", "stuck_running", "stuck_pending"]),
    ],
)
def test_the_plan_is_the_seeds_order_of_enabled_rules(
    switches: dict[str, bool], expected: list[str]
) -> None:
    plan = rules.task_rules(default_host(), Settings(**switches), NOW)  # type: ignore[arg-type]
    assert [rule.name for rule in plan] == expected


def test_each_rule_carries_its_effect_journal_action_and_signal() -> None:
    by_name = {rule.name: rule for rule in rules.task_rules(default_host(), Settings(), NOW)}
    assert isinstance(by_name["orphan_tasks"].effect, rules.SetStatus)
    assert by_name["orphan_tasks"].effect.status == "cancelled"
    assert (by_name["stuck_running"].effect.status, by_name["stuck_running"].action) == (  # type: ignore[union-attr]
        "failed", "task_failed",
    )
    assert by_name["stuck_running"].signal is signals.task_failed
    assert by_name["stuck_pending"].signal is signals.task_cancelled
    assert isinstance(by_name["old_tasks"].effect, rules.Delete)
    assert (by_name["old_tasks"].action, by_name["old_tasks"].signal) == (
        "task_purged", signals.tasks_purged,
    )
    assert not by_name["old_tasks"].repeat, "no sub-tasks mapped: one round"


def test_orphan_keys_compare_the_tree_with_the_keys() -> None:
    present = {AppKey("m", 1)}
    rows: list[AppRow] = [("m", 1, 2, 0), ("m", 2, 3, 0), ("m", 3, 1, 1), ("locked", 1, 1, 0)]
    assert orphan_keys(present, rows, unknown_slugs={"locked"}) == [AppKey("m", 2)]


@pytest.mark.parametrize(
    ("kwargs", "refused"),
    [
        ({"root_problem": "root-missing", "force": True}, "missing"),
        # An empty root (treehealth's verdict) is not passed by --force.
        ({"root_problem": "root-empty", "force": True}, "no app directory"),
        ({"orphans": 60}, "more than the allowed"),
        ({"orphans": 60, "force": True}, None),
        ({"orphans": 50}, None),
    ],
)
def test_the_guard(kwargs: dict[str, object], refused: str | None) -> None:
    values: dict[str, object] = {
        "root_problem": None, "rows": 100, "orphans": 0, "max_fraction": 0.5, "force": False,
    }
    values.update(kwargs)
    reason = guard(**values)  # type: ignore[arg-type]
    assert (reason is None) if refused is None else (reason is not None and refused in reason)


def test_the_batch_follows_its_time_budget() -> None:
    sizer = BatchSizer(500, budget=0.1)
    sizer.record(500, 0.01)  # ten times faster than the budget: grows, at most doubling
    assert sizer.size == 1000
    sizer.record(1000, 1.0)  # ten times slower: shrinks, at most to a quarter
    assert sizer.size == 250
    for _ in range(20):
        sizer.record(sizer.size, 10.0)
    assert sizer.size == 20, "never below the floor"
    tiny = BatchSizer(7, budget=0.1)
    tiny.record(7, 10.0)
    assert tiny.size == 7, "a batch size below the floor is its own floor"


def test_the_batch_is_sized_to_leave_a_margin_in_the_budget() -> None:
    sizer = BatchSizer(1000, budget=0.1)
    sizer.record(1000, 0.1)  # took the whole budget: the next one is sized to 60 % of it
    assert sizer.size == 600
    sizer.record(600, 0.06)  # on target: stays
    assert sizer.size == 600


def test_keys_are_one_term_per_model_and_integer_keys_are_inlined() -> None:
    host = default_host()
    text = sql(rules.app_keys(host, [AppKey("a", 1), AppKey("a", 2), AppKey("b", 7)]))
    assert text == (
        "generated_applications.model_slug = 'a' AND generated_applications.app_number IN (1, 2)"
        " OR generated_applications.model_slug = 'b' AND generated_applications.app_number IN (7)"
    )
    # Compiled without literal_binds: the integers are still in the statement, not parameters.
    compiled = db.one_of(host.app_col("id"), [1, 2, 3]).compile(dialect=DIALECTS["postgresql"])
    assert "POSTCOMPILE" in str(compiled) and "= 1" not in str(compiled)


@pytest.mark.parametrize(
    ("rendering", "expected_time"),
    [
        ('"2026-06-01 12:00:00.000000"', datetime(2026, 6, 1, 12, 0)),  # SQLite, MariaDB
        ('"2026-06-01T12:00:00"', datetime(2026, 6, 1, 12, 0)),  # PostgreSQL timestamp
        ('"2026-06-01T12:00:00+00:00"', NOW),  # PostgreSQL timestamptz
    ],
)
def test_images_from_every_backend_decode_to_the_column_values(
    rendering: str, expected_time: datetime
) -> None:
    metadata = sa.MetaData()
    table = sa.Table(
        "t", metadata,
        sa.Column("at", sa.DateTime()), sa.Column("blob", sa.LargeBinary()),
        sa.Column("price", sa.Numeric(30, 10)), sa.Column("ok", sa.Boolean()),
        sa.Column("n", sa.BigInteger()),
    )
    for blob in ('"\\\\x0aff"', '"0AFF"'):
        text = (
            f'{{"at": {rendering}, "blob": {blob}, "price": 12345678901234567890.0123456789,'
            ' "ok": 1, "n": 9223372036854775807, "gone": 3}'
        )
        values = images.decode(table, text)
        assert values == {
            "at": expected_time,
            "blob": b"\n\xff",
            "price": Decimal("12345678901234567890.0123456789"),
            "ok": True,
            "n": 2**63 - 1,
        }


def test_batch_ids_sort_by_time(monkeypatch: pytest.MonkeyPatch) -> None:
    moments = iter([1_000_000_000_000_000_000 + n * 1_000_000 for n in range(50)])
    monkeypatch.setattr(time, "time_ns", lambda: next(moments))
    ids = [images.new_batch_id() for _ in range(50)]
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert {uuid.UUID(i).version for i in ids} == {7}


@pytest.mark.parametrize(
    ("indexes", "indexed"),
    [
        ([("model_slug", "app_number")], True),
        ([("app_number", "model_slug")], True),
        ([("model_slug", "app_number", "version")], True),  # several rows per key
        ([("model_slug",)], False),  # a probe would read every row of the model
        ([("created_at",), ("version", "model_slug", "app_number")], False),
        ([], False),
    ],
)
def test_the_key_index_is_found_in_any_order_and_only_in_the_lead(
    indexes: list[tuple[str, ...]], indexed: bool
) -> None:
    metadata = sa.MetaData()
    apps = sa.Table(
        "apps", metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("model_slug", sa.String(200)),
        sa.Column("app_number", sa.Integer),
        sa.Column("version", sa.Integer),
        sa.Column("created_at", sa.DateTime()),
    )
    for n, columns in enumerate(indexes):
        sa.Index(f"ix_{n}", *(apps.c[name] for name in columns))
    host = HostTables(
        apps=apps,
        tasks=default_host().tasks,
        dependents=(),
        config=SchemaConfig(apps_table="apps"),
    )
    assert host.app_key_indexed is indexed
    text = sql(
        sa.select(apps.c.id).where(rules.young_key(host, NOW - timedelta(minutes=10))),
        "postgresql",
    )
    assert ("OFFSET 0" in text) is indexed
