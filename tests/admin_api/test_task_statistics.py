"""On-time and acceptance rates of collection tasks: hand-checked small cases and a 400 × 20 dataset.

The module has its own environment per backend, because the rates cover every task whose deadline
has passed and the other modules' tasks would change them. The small case uses reporting year
2019 and the large one 2020, and every query filters by year.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import event

from admin_api.db import utc_now
from admin_api.task_statistics import RateFilter, rate_rows, totals

from .conftest import BACKENDS, Env, backend_env
from .task_data import Seeder, Upload

TEMPLATE = "EAST_DGKHXXB"
OTHER_TEMPLATE = "EAST_XDHTB"
D1 = datetime(2019, 2, 15, 10, 0, tzinfo=UTC)
D2 = datetime(2019, 3, 15, 10, 0, tzinfo=UTC)
SMALL = RateFilter(year=2019)
LARGE = RateFilter(year=2020)
INSTITUTION_COUNT = 400
TASK_COUNT = 20


@pytest.fixture(scope="module", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from backend_env(request.param, tmp_path_factory, "stats")


@pytest.fixture(scope="module")
def small(env: Env) -> dict[str, int]:
    """Four institutions and three tasks whose outcomes are worked out by hand in the tests below.

    Task 1 (deadline D1) targets a, b, c, d. a: submitted 2 days early, accepted. b: failed
    validation early, resubmitted a day late, accepted. c: submitted a day early, returned,
    resubmitted late and still pending. d: nothing. Task 2 (D2) targets a and b. a: nothing.
    b: submitted early, accepted. Task 3 targets a with a deadline still ahead, so it is not counted.
    """
    with env.db() as session:
        seed = Seeder.for_user(session, "reporter_a")
        ids = seed.institutions(["st_a", "st_b", "st_c", "st_d"])
        first = seed.task(TEMPLATE, date(2019, 1, 31), D1, list(ids.values()))
        second = seed.task(TEMPLATE, date(2019, 2, 28), D2, [ids["st_a"], ids["st_b"]])
        seed.task(TEMPLATE, date(2019, 3, 31), utc_now() + timedelta(days=10), [ids["st_a"]])
        day = timedelta(days=1)
        seed.uploads(ids["st_a"], TEMPLATE, date(2019, 1, 31), [
            Upload("accepted", [("pending_review", D1 - 2 * day), ("accepted", D1 - day)])])
        seed.uploads(ids["st_b"], TEMPLATE, date(2019, 1, 31), [
            Upload("validation_failed", [("validation_failed", D1 - 3 * day)], error_count=4),
            Upload("accepted", [("pending_review", D1 + day), ("accepted", D1 + 2 * day)])])
        seed.uploads(ids["st_c"], TEMPLATE, date(2019, 1, 31), [
            Upload("returned", [("pending_review", D1 - day), ("returned", D1 + timedelta(hours=1))]),
            Upload("pending_review", [("pending_review", D1 + 2 * day)])])
        seed.uploads(ids["st_b"], TEMPLATE, date(2019, 2, 28), [
            Upload("accepted", [("pending_review", D2 - day), ("accepted", D2)])])
        # a report of another template and of a period without a task changes nothing
        seed.uploads(ids["st_d"], OTHER_TEMPLATE, date(2019, 1, 31), [
            Upload("accepted", [("pending_review", D1 - day), ("accepted", D1)])])
        seed.flush()
        session.commit()
    return {"first": first, "second": second}


def counts(rows: list) -> dict[str, tuple]:
    return {row.code or str(row.task_id): (row.targets, row.submitted, row.on_time, row.late, row.missing,
                                           row.accepted) for row in rows}


def test_rates_per_institution_by_hand(env: Env, small: dict[str, int]) -> None:
    with env.db() as session:
        rows = rate_rows(session, "institution", SMALL)

    assert counts(rows) == {
        "st_a": (2, 1, 1, 0, 1, 1),
        "st_b": (2, 2, 1, 1, 0, 2),
        "st_c": (1, 1, 1, 0, 0, 0),
        "st_d": (1, 0, 0, 0, 1, 0),
    }
    rates = {row.code: (row.on_time_rate, row.acceptance_rate) for row in rows}
    assert rates == {"st_a": (0.5, 1.0), "st_b": (0.5, 1.0), "st_c": (1.0, 0.0), "st_d": (0.0, None)}
    assert [row.code for row in rows] == ["st_d", "st_a", "st_b", "st_c"]


def test_rates_per_task_by_hand(env: Env, small: dict[str, int]) -> None:
    with env.db() as session:
        rows = rate_rows(session, "task", SMALL)

    assert counts(rows) == {str(small["first"]): (4, 3, 2, 1, 1, 2), str(small["second"]): (2, 1, 1, 0, 1, 1)}
    by_id = {row.task_id: row for row in rows}
    assert by_id[small["first"]].acceptance_rate == pytest.approx(2 / 3)
    assert (by_id[small["first"]].period_end, by_id[small["first"]].deadline) == (date(2019, 1, 31), D1)
    assert [row.task_id for row in rows] == [small["first"], small["second"]]
    total = totals(rows)
    assert (total.targets, total.on_time, total.accepted, total.on_time_rate) == (6, 3, 3, 0.5)


def test_task_detail_agrees_with_rates(env: Env, small: dict[str, int]) -> None:
    detail = env.client.get(f"/api/v1/tasks/{small['first']}", headers=env.auth("reviewer")).json()

    on_time = {item["institution_code"]: item["on_time"] for item in detail["targets"]}
    assert on_time == {"st_a": True, "st_b": False, "st_c": True, "st_d": False}
    assert (detail["on_time_count"], detail["accepted_count"]) == (2, 2)
    states = {item["institution_code"]: item["state_name"] for item in detail["targets"]}
    assert states == {"st_a": "审核通过", "st_b": "审核通过", "st_c": "已报送待审核", "st_d": "未报送"}


@pytest.mark.parametrize(("sort", "descending", "expected"), [
    ("acceptance_rate", False, ["st_c", "st_a", "st_b", "st_d"]),
    ("acceptance_rate", True, ["st_a", "st_b", "st_c", "st_d"]),
    ("on_time_rate", True, ["st_c", "st_b", "st_a", "st_d"]),
    ("missing", True, ["st_a", "st_d", "st_b", "st_c"]),
    ("late", True, ["st_b", "st_a", "st_c", "st_d"]),
    ("key", True, ["st_d", "st_c", "st_b", "st_a"]),
])
def test_sort_orders(env: Env, small: dict[str, int], sort: str, descending: bool, expected: list[str]) -> None:
    with env.db() as session:
        rows = rate_rows(session, "institution", SMALL, sort=sort, descending=descending)

    assert [row.code for row in rows] == expected


def test_template_filter_and_limit(env: Env, small: dict[str, int]) -> None:
    with env.db() as session:
        other = rate_rows(session, "institution", RateFilter(year=2019, template_code=OTHER_TEMPLATE))
        worst = rate_rows(session, "institution", SMALL, limit=2)

    assert other == []
    assert [row.code for row in worst] == ["st_d", "st_a"]


def test_unknown_sort_rejected(env: Env) -> None:
    from admin_api.errors import ApiError

    with env.db() as session, pytest.raises(ApiError) as raised:
        rate_rows(session, "institution", SMALL, sort="name; drop table x")

    assert raised.value.code == "SORT_INVALID"
    assert "on_time_rate" in raised.value.message


# --- 400 institutions × 20 tasks ---------------------------------------------------------------------


def outcome(institution: int, task: int) -> str:
    """A fixed spread of outcomes over the targets of the large dataset."""
    return ["missing", "missing", "late_accepted", "returned_then_late", "on_time_pending", "failed_only",
            "on_time_accepted", "on_time_accepted", "on_time_returned", "on_time_accepted"][(institution * 7 + task * 3) % 10]


OUTCOME_COUNTS = {
    # outcome: (submitted, on time, accepted)
    "missing": (0, 0, 0),
    "failed_only": (0, 0, 0),
    "late_accepted": (1, 0, 1),
    "returned_then_late": (1, 1, 1),
    "on_time_pending": (1, 1, 0),
    "on_time_accepted": (1, 1, 1),
    "on_time_returned": (1, 1, 0),
}


def large_uploads(kind: str, deadline: datetime) -> list[Upload]:
    hour = timedelta(hours=1)
    return {
        "missing": [],
        "failed_only": [Upload("validation_failed", [("validation_failed", deadline - hour)], error_count=1)],
        "late_accepted": [Upload("accepted", [("pending_review", deadline + hour), ("accepted", deadline + 2 * hour)])],
        "returned_then_late": [
            Upload("returned", [("pending_review", deadline - 5 * hour), ("returned", deadline - 4 * hour)]),
            Upload("accepted", [("pending_review", deadline + 3 * hour), ("accepted", deadline + 4 * hour)])],
        "on_time_pending": [Upload("pending_review", [("pending_review", deadline)])],
        "on_time_accepted": [Upload("accepted", [("pending_review", deadline - hour), ("accepted", deadline + hour)])],
        "on_time_returned": [Upload("returned", [("pending_review", deadline - hour), ("returned", deadline + hour)],
                                    review_comment="请核对注册资本")],
    }[kind]


@pytest.fixture(scope="module")
def large(env: Env) -> dict[str, list]:
    """Seed 400 institutions and 20 monthly tasks of 2020 on two templates, every institution targeted by every task."""
    codes = [f"lg_{number:03d}" for number in range(INSTITUTION_COUNT)]
    task_ids = []
    with env.db() as session:
        seed = Seeder.for_user(session, "reporter_a")
        ids = seed.institutions(codes)
        for number in range(TASK_COUNT):
            template = TEMPLATE if number < 12 else OTHER_TEMPLATE
            month = number % 12 + 1
            period = (date(2020, month + 1, 1) if month < 12 else date(2021, 1, 1)) - timedelta(days=1)
            deadline = datetime(2021, 1, 10, tzinfo=UTC) + timedelta(days=number)
            task_ids.append(seed.task(template, period, deadline, [ids[code] for code in codes]))
            for index, code in enumerate(codes):
                seed.uploads(ids[code], template, period, large_uploads(outcome(index, number), deadline))
            seed.flush()
        session.commit()
    return {"codes": codes, "tasks": task_ids}


def expected_counts(institutions: range, tasks: range) -> tuple[int, int, int, int]:
    submitted = on_time = accepted = 0
    for institution in institutions:
        for task in tasks:
            target_counts = OUTCOME_COUNTS[outcome(institution, task)]
            submitted += target_counts[0]
            on_time += target_counts[1]
            accepted += target_counts[2]
    return len(institutions) * len(tasks), submitted, on_time, accepted


def test_large_dataset_per_institution(env: Env, large: dict[str, list]) -> None:
    statements: list[str] = []
    engine = env.session_factory.kw["bind"]
    listener = lambda *args: statements.append(args[2])  # noqa: E731  # (conn, cursor, statement, ...)
    with env.db() as session:
        event.listen(engine, "before_cursor_execute", listener)
        try:
            rows = rate_rows(session, "institution", LARGE)
        finally:
            event.remove(engine, "before_cursor_execute", listener)

    assert len(statements) == 1
    assert len(rows) == INSTITUTION_COUNT
    found = {row.code: (row.targets, row.submitted, row.on_time, row.accepted) for row in rows}
    expected = {code: expected_counts(range(index, index + 1), range(TASK_COUNT))
                for index, code in enumerate(large["codes"])}
    assert found == expected
    ratios = [row.on_time_rate for row in rows]
    assert ratios == sorted(ratios)


def test_large_dataset_per_task(env: Env, large: dict[str, list]) -> None:
    with env.db() as session:
        rows = rate_rows(session, "task", LARGE, sort="acceptance_rate")
        first_template = rate_rows(session, "task", RateFilter(year=2020, template_code=TEMPLATE))

    assert len(rows) == TASK_COUNT
    found = {row.task_id: (row.targets, row.submitted, row.on_time, row.accepted) for row in rows}
    expected = {task_id: expected_counts(range(INSTITUTION_COUNT), range(number, number + 1))
                for number, task_id in enumerate(large["tasks"])}
    assert found == expected
    rates = [row.acceptance_rate for row in rows]
    assert rates == sorted(rates)
    assert {row.task_id for row in first_template} == set(large["tasks"][:12])
    assert totals(rows).targets == INSTITUTION_COUNT * TASK_COUNT
