"""数据质量: completeness, validity and timeliness worked out by hand, access per role, and a 400 × 20 dataset.

The module has its own environment per backend, because the measures cover every task whose
deadline has passed. Tasks, submissions and their state changes are written straight into the
database (:mod:`.task_data`), and each validated upload gets a findings Parquet file with the
schema validation writes, and field counts where a test needs them. The small case uses reporting
year 2018, the large one 2017, and single cases 2014, 2015, 2016 and 2019. Uploads of 2015 and 2019
go through the API, so the real validator's findings and field counts are counted too.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import event, insert, select, update

from admin_api import console_data_quality, data_quality
from admin_api.db import utc_now
from admin_api.models import Institution, ReportSubmission, SubmissionFieldCount
from intake.validate import FINDINGS_SCHEMA
from regsandbox_core.settings import Settings

from .conftest import BACKENDS, Env, backend_env
from .helpers import audit_events, console_cookie
from .test_console_keys import CHROMIUM, CHROMIUM_ARGS, served_admin_api  # noqa: F401 - fixture
from .task_data import Seeder, Upload
from .test_submissions import bank_a_licence, customer_row, loan_row, text_file, upload  # noqa: F401  # fixture

TEMPLATE = "EAST_DGKHXXB"
P1, P2, P3 = date(2018, 1, 31), date(2018, 2, 28), date(2018, 3, 31)
UNREAD_PERIOD = date(2016, 3, 31)
VERSIONS_PERIOD = date(2014, 3, 31)
WEIGHTED_PERIODS = (date(2013, 1, 31), date(2013, 2, 28))
REAL_PERIOD = "20150131"
D1 = datetime(2018, 2, 15, 10, 0, tzinfo=UTC)
D2 = datetime(2018, 3, 15, 10, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SMALL = {"period_from": "20180101", "period_to": "20181231"}
LARGE_YEAR = 2017
INSTITUTION_COUNT = 400
TASK_COUNT = 20


@pytest.fixture(scope="module", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from backend_env(request.param, tmp_path_factory, "quality")


def write_findings(env: Env, name: str, lines: Sequence[tuple[int | None, str]]) -> str:
    """Write a findings file of (line, severity) findings and return its path relative to the data directory."""
    relative = Path("intake") / "quality-test" / name / "findings.parquet"
    path = env.settings.data_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    count = len(lines)
    columns = {name: pa.nulls(count, FINDINGS_SCHEMA.field(name).type) for name in FINDINGS_SCHEMA.names}
    columns["line"] = pa.array([line for line, _ in lines], pa.int64())
    columns["severity"] = pa.array([severity for _, severity in lines], pa.string())
    pq.write_table(pa.table(columns, schema=FINDINGS_SCHEMA), path)
    return relative.as_posix()


def set_validation(env: Env, institution_id: int, period: date, version: int, rows: int, errors: int,
                   findings: str) -> None:
    with env.db() as session:
        session.execute(update(ReportSubmission).where(
            ReportSubmission.institution_id == institution_id, ReportSubmission.template_code == TEMPLATE,
            ReportSubmission.period_end == period, ReportSubmission.version == version,
        ).values(row_count=rows, error_count=errors, findings_path=findings))
        session.commit()


@pytest.fixture(scope="module")
def small(env: Env) -> dict[str, int]:
    """Three test institutions and bank_a, three tasks and five uploads whose measures are worked out by hand.

    Task 1 (period P1, deadline D1) targets dq_a, dq_b, dq_c and bank_a. dq_a: submitted 2 days early,
    10 rows without errors. dq_b: version 1 failed validation early with 5 errors, on lines 2, 2, 5, 7
    and one about the whole file, so 3 of its 10 rows have errors. Version 2 was submitted a day
    late, 10 rows without errors. dq_c and bank_a: nothing. Task 2 (P2, D2) targets dq_a and dq_b. dq_a:
    submitted a day early, 4 rows without errors. dq_b: only a draft with errors, which does not count.
    Task 3 (P3) targets dq_a with a deadline still ahead, so it is not counted.
    """
    with env.db() as session:
        seed = Seeder.for_user(session, "reporter_a")
        ids = seed.institutions(["dq_a", "dq_b", "dq_c"])
        ids["bank_a"] = session.scalar(select(Institution.id).where(Institution.code == "bank_a"))
        seed.task(TEMPLATE, P1, D1, [ids["dq_a"], ids["dq_b"], ids["dq_c"], ids["bank_a"]])
        seed.task(TEMPLATE, P2, D2, [ids["dq_a"], ids["dq_b"]])
        seed.task(TEMPLATE, P3, utc_now() + timedelta(days=10), [ids["dq_a"]])
        seed.uploads(ids["dq_a"], TEMPLATE, P1, [Upload("accepted", [("pending_review", D1 - 2 * DAY),
                                                                     ("accepted", D1 - DAY)])])
        seed.uploads(ids["dq_b"], TEMPLATE, P1, [
            Upload("validation_failed", [("validation_failed", D1 - 3 * DAY)]),
            Upload("accepted", [("pending_review", D1 + DAY), ("accepted", D1 + 2 * DAY)])])
        seed.uploads(ids["dq_a"], TEMPLATE, P2, [Upload("pending_review", [("pending_review", D2 - DAY)])])
        seed.uploads(ids["dq_b"], TEMPLATE, P2, [Upload("draft", [("draft", D2 - DAY)])])
        seed.flush()
        session.commit()
    clean = [(1, "warning")]
    set_validation(env, ids["dq_a"], P1, 1, 10, 0, write_findings(env, "a-p1", clean))
    set_validation(env, ids["dq_b"], P1, 1, 10, 5, write_findings(env, "b-p1-v1", [
        (2, "error"), (2, "error"), (5, "error"), (7, "error"), (None, "error"), (9, "warning")]))
    set_validation(env, ids["dq_b"], P1, 2, 10, 0, write_findings(env, "b-p1-v2", clean))
    set_validation(env, ids["dq_a"], P2, 1, 4, 0, write_findings(env, "a-p2", []))
    set_validation(env, ids["dq_b"], P2, 1, 8, 2, write_findings(env, "b-p2-draft", [(1, "error"), (3, "error")]))
    return ids


def submission_id(env: Env, institution_id: int, period: date, version: int) -> int:
    with env.db() as session:
        return session.scalars(select(ReportSubmission.id).where(
            ReportSubmission.institution_id == institution_id, ReportSubmission.template_code == TEMPLATE,
            ReportSubmission.period_end == period, ReportSubmission.version == version)).one()


def add_field_counts(env: Env, counts: Sequence[tuple[int, int, int, int, int, int]]) -> None:
    """Store field counts given as (submission id, rows, fields, required fields, non-empty, required non-empty)."""
    with env.db() as session:
        session.execute(insert(SubmissionFieldCount), [
            {"submission_id": item_id, "row_count": rows, "field_count": fields, "required_field_count": required,
             "present_values": present, "required_present_values": required_present, "field_values": {}}
            for item_id, rows, fields, required, present, required_present in counts])
        session.commit()


@pytest.fixture(scope="module")
def field_counts(env: Env, small: dict[str, int]) -> dict[str, int]:
    """Field counts of the small case: 4 fields of which 2 required, on every upload but dq_a's of P2.

    dq_a P1 (accepted, 10 rows): 36 of 40 values, 20 of 20 required. dq_b P1 version 1 (superseded): 10 of 40,
    and version 2 (accepted, 10 rows): 30 of 40, 18 of 20 required. dq_b P2 is a draft with 0 of 32. dq_a P2
    (pending review) was uploaded before field counts existed, so it has none.
    """
    add_field_counts(env, [
        (submission_id(env, small["dq_a"], P1, 1), 10, 4, 2, 36, 20),
        (submission_id(env, small["dq_b"], P1, 1), 10, 4, 2, 10, 5),
        (submission_id(env, small["dq_b"], P1, 2), 10, 4, 2, 30, 18),
        (submission_id(env, small["dq_b"], P2, 1), 8, 4, 2, 0, 0),
    ])
    return small


def read(env: Env, username: str, request_id: str | None = None, **params: Any) -> Any:
    headers = env.auth(username)
    if request_id:
        headers = {**headers, "X-Request-ID": request_id}
    return env.client.get("/api/v1/data-quality", headers=headers, params={**SMALL, **params})


def ok(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def measures(row: dict[str, Any]) -> tuple:
    return (row["expected"], row["received"], row["on_time"], row["uploads"], row["rows_validated"],
            row["rows_with_errors"])


# --- measures by hand ------------------------------------------------------------------------------


def test_groups_by_hand(env: Env, small: dict[str, int]) -> None:
    body = ok(read(env, "analyst", template_code=TEMPLATE))

    rows = {(row["institution"], row["period_end"]): row for row in body["rows"]}
    assert {key: measures(row) for key, row in rows.items()} == {
        ("bank_a", "20180131"): (1, 0, 0, 0, 0, 0),
        ("dq_a", "20180131"): (1, 1, 1, 1, 10, 0),
        ("dq_a", "20180228"): (1, 1, 1, 1, 4, 0),
        ("dq_b", "20180131"): (1, 1, 0, 2, 20, 3),
        ("dq_b", "20180228"): (1, 0, 0, 0, 0, 0),
        ("dq_c", "20180131"): (1, 0, 0, 0, 0, 0),
    }
    assert rows[("dq_b", "20180131")]["validity"] == pytest.approx(17 / 20)
    assert rows[("dq_b", "20180131")]["timeliness"] == 0.0
    assert rows[("dq_b", "20180131")]["completeness"] == 1.0
    assert rows[("dq_c", "20180131")]["validity"] is None
    assert rows[("dq_a", "20180131")]["institution_name"] == "统计测试机构dq_a"
    assert all(row["template_code"] == TEMPLATE for row in body["rows"])
    total = body["total"]
    assert measures(total) == (6, 3, 2, 4, 34, 3)
    assert total["completeness"] == pytest.approx(0.5)
    assert total["timeliness"] == pytest.approx(2 / 6)
    assert total["validity"] == pytest.approx(31 / 34)
    assert body["group_count"] == 6
    assert body["estimated_uploads"] == 0


def test_group_by_institution(env: Env, small: dict[str, int]) -> None:
    body = ok(read(env, "analyst", group_by=["institution"]))

    assert body["group_by"] == ["institution"]
    assert {row["institution"]: measures(row) for row in body["rows"]} == {
        "bank_a": (1, 0, 0, 0, 0, 0), "dq_a": (2, 2, 2, 2, 14, 0), "dq_b": (2, 1, 0, 2, 20, 3),
        "dq_c": (1, 0, 0, 0, 0, 0)}
    assert all(row["period_end"] is None and row["template_code"] is None for row in body["rows"])


def test_group_by_period(env: Env, small: dict[str, int]) -> None:
    body = ok(read(env, "steward", group_by=["period"]))

    assert {row["period_end"]: measures(row) for row in body["rows"]} == {
        "20180131": (4, 2, 1, 3, 30, 3), "20180228": (2, 1, 1, 1, 4, 0)}


def test_filters_and_sort(env: Env, small: dict[str, int]) -> None:
    only_b = ok(read(env, "analyst", institution="dq_b", period_from="20180101", period_to="20180131"))
    by_validity = ok(read(env, "analyst", sort="validity", group_by=["institution"]))
    page = ok(read(env, "analyst", group_by=["institution"], offset=1, limit=2))

    assert [measures(row) for row in only_b["rows"]] == [(1, 1, 0, 2, 20, 3)]
    assert [row["institution"] for row in by_validity["rows"]] == ["dq_b", "dq_a", "bank_a", "dq_c"]
    assert [row["institution"] for row in page["rows"]] == ["dq_a", "dq_b"]
    assert page["group_count"] == 4
    assert measures(page["total"]) == (6, 3, 2, 4, 34, 3)


def test_missing_findings_estimated(env: Env, small: dict[str, int]) -> None:
    with env.db() as session:
        seed = Seeder.for_user(session, "reporter_a")
        seed.uploads(small["dq_c"], TEMPLATE, UNREAD_PERIOD, [Upload("returned", [("pending_review", D2),
                                                                                  ("returned", D2)])])
        seed.flush()
        session.commit()
    set_validation(env, small["dq_c"], UNREAD_PERIOD, 1, 3, 7, "intake/quality-test/gone/findings.parquet")

    body = ok(read(env, "analyst", institution="dq_c", period_from="20160331", period_to="20160331"))

    assert [measures(row) for row in body["rows"]] == [(0, 0, 0, 1, 3, 3)]
    assert body["estimated_uploads"] == 1
    assert "无法读取" in body["notes"][0]


def test_error_row_cache_per_data_dir(tmp_path: Path) -> None:
    """Two data directories (two databases in one process) may have uploads with the same id."""
    first, second = Settings(data_dir=tmp_path / "first"), Settings(data_dir=tmp_path / "second")
    relative = "intake/cache-test/findings.parquet"
    path = first.data_dir / relative
    path.parent.mkdir(parents=True)
    columns = {name: pa.nulls(2, FINDINGS_SCHEMA.field(name).type) for name in FINDINGS_SCHEMA.names}
    columns["line"] = pa.array([2, 3], pa.int64())
    columns["severity"] = pa.array(["error", "error"])
    pq.write_table(pa.table(columns, schema=FINDINGS_SCHEMA), path)
    data_quality.clear_error_row_cache()

    counts_first, estimated_first = data_quality.error_rows(first, [(7, relative, 5, 9)])
    counts_second, estimated_second = data_quality.error_rows(second, [(7, relative, 5, 9)])

    assert (counts_first, estimated_first) == ({7: 2}, 0)
    assert (counts_second, estimated_second) == ({7: 5}, 1)


# --- field completeness by hand ---------------------------------------------------------------------


def field_measures(row: dict[str, Any]) -> tuple:
    return (row["reports"], row["field_reports"], row["cells"], row["present_values"], row["required_cells"],
            row["required_present_values"])


def test_field_completeness_by_hand(env: Env, field_counts: dict[str, int]) -> None:
    body = ok(read(env, "analyst", template_code=TEMPLATE))

    rows = {(row["institution"], row["period_end"]): row for row in body["rows"]}
    assert {key: field_measures(row) for key, row in rows.items()} == {
        ("bank_a", "20180131"): (0, 0, 0, 0, 0, 0),
        ("dq_a", "20180131"): (1, 1, 40, 36, 20, 20),
        ("dq_a", "20180228"): (1, 0, 0, 0, 0, 0),
        ("dq_b", "20180131"): (1, 1, 40, 30, 20, 18),
        ("dq_b", "20180228"): (0, 0, 0, 0, 0, 0),
        ("dq_c", "20180131"): (0, 0, 0, 0, 0, 0),
    }
    assert rows[("dq_a", "20180131")]["field_completeness"] == pytest.approx(0.9)
    assert rows[("dq_a", "20180131")]["required_field_completeness"] == 1.0
    assert rows[("dq_b", "20180131")]["field_completeness"] == pytest.approx(0.75)
    assert rows[("dq_b", "20180131")]["required_field_completeness"] == pytest.approx(0.9)
    assert rows[("dq_a", "20180228")]["field_completeness"] is None
    assert rows[("dq_b", "20180228")]["required_field_completeness"] is None
    assert field_measures(body["total"]) == (3, 2, 80, 66, 40, 38)
    assert body["total"]["field_completeness"] == pytest.approx(66 / 80)
    assert body["total"]["required_field_completeness"] == pytest.approx(38 / 40)
    assert "1 份报表的当前版本上传时尚未统计字段非空值" in body["notes"][0]


def test_field_completeness_sort(env: Env, field_counts: dict[str, int]) -> None:
    body = ok(read(env, "analyst", group_by=["institution"], sort="field_completeness"))

    assert [row["institution"] for row in body["rows"]] == ["dq_b", "dq_a", "bank_a", "dq_c"]
    dq_a = body["rows"][1]
    assert field_measures(dq_a) == (2, 1, 40, 36, 20, 20)
    assert dq_a["field_completeness"] == pytest.approx(0.9)
    by_required = ok(read(env, "analyst", group_by=["institution"], sort="required_field_completeness"))
    assert [row["institution"] for row in by_required["rows"]] == ["dq_b", "dq_a", "bank_a", "dq_c"]


def test_field_completeness_weighted_by_rows(env: Env, field_counts: dict[str, int]) -> None:
    """Two reports of dq_c: 10 rows at 50 % and 30 rows at 100 %, so 87.5 % together, not the mean 75 %."""
    with env.db() as session:
        seed = Seeder.for_user(session, "reporter_a")
        for period in WEIGHTED_PERIODS:
            seed.uploads(field_counts["dq_c"], TEMPLATE, period, [Upload("accepted", [("accepted", D1)])])
        seed.flush()
        session.commit()
    for period, rows in zip(WEIGHTED_PERIODS, (10, 30), strict=True):
        set_validation(env, field_counts["dq_c"], period, 1, rows, 0, write_findings(env, f"c-{period:%Y%m}", []))
    add_field_counts(env, [(submission_id(env, field_counts["dq_c"], WEIGHTED_PERIODS[0], 1), 10, 4, 2, 20, 10),
                           (submission_id(env, field_counts["dq_c"], WEIGHTED_PERIODS[1], 1), 30, 4, 2, 120, 60)])

    body = ok(read(env, "analyst", institution="dq_c", group_by=["institution"], period_from="20130101",
                   period_to="20131231"))

    assert [field_measures(row) for row in body["rows"]] == [(2, 2, 160, 140, 80, 70)]
    assert body["rows"][0]["field_completeness"] == pytest.approx(0.875)
    assert body["rows"][0]["required_field_completeness"] == pytest.approx(0.875)


def test_field_completeness_current_version(env: Env, field_counts: dict[str, int]) -> None:
    """Version 1 accepted, version 2 failed validation later (version 1 stays accepted), version 3 a draft."""
    with env.db() as session:
        seed = Seeder.for_user(session, "reporter_a")
        seed.uploads(field_counts["dq_c"], TEMPLATE, VERSIONS_PERIOD, [
            Upload("accepted", [("pending_review", D1), ("accepted", D1)]),
            Upload("validation_failed", [("validation_failed", D2)]),
            Upload("draft", [("draft", D2)])])
        seed.flush()
        for version, state in ((1, "accepted"), (2, "validation_failed")):  # the seeder marks them superseded
            session.execute(update(ReportSubmission).where(
                ReportSubmission.institution_id == field_counts["dq_c"], ReportSubmission.period_end == VERSIONS_PERIOD,
                ReportSubmission.version == version).values(state=state))
        session.commit()
    for version in (1, 2, 3):
        set_validation(env, field_counts["dq_c"], VERSIONS_PERIOD, version, 10, 0,
                       write_findings(env, f"c-versions-{version}", []))
    add_field_counts(env, [(submission_id(env, field_counts["dq_c"], VERSIONS_PERIOD, version), 10, 2, 1, present, 5)
                           for version, present in ((1, 20), (2, 10), (3, 2))])
    period = {"period_from": "20140331", "period_to": "20140331"}

    grouped = ok(read(env, "analyst", institution="dq_c", **period))
    fields = ok(env.client.get("/api/v1/data-quality/fields", headers=env.auth("analyst"),
                               params={"institution": "dq_c", "template_code": TEMPLATE, "period": "20140331"}))

    assert [field_measures(row) for row in grouped["rows"]] == [(1, 1, 20, 10, 10, 5)]
    assert grouped["rows"][0]["field_completeness"] == 0.5
    assert (fields["version"], fields["state"], fields["state_name"]) == (2, "validation_failed", "校验未通过")


# --- per-field breakdown of a real upload ------------------------------------------------------------


CUSTOMERS = "EAST_DGKHXXB"
CUSTOMER_FIELDS = 21
CUSTOMER_REQUIRED = 17


@pytest.fixture(scope="module")
def real_customers(env: Env, bank_a_licence: None) -> dict[str, Any]:  # noqa: F811
    """Three customer rows of bank_a with known blanks, then a complete draft of the same period.

    Blanks: 备注 BEIZ on rows 1 and 2; 注册资本 ZCZB, its currency ZCZBBZ and the mobile CWLXRSJ (spaces only)
    on row 2; the required 注册地址 ZCDZ on row 3, which fails validation. So 57 of 63 values are present and
    50 of the 51 required ones.
    """
    rows = [customer_row(1, REAL_PERIOD), {**customer_row(2, REAL_PERIOD), "ZCZB": "", "ZCZBBZ": "", "CWLXRSJ": "  "},
            {**customer_row(3, REAL_PERIOD), "ZCDZ": "", "BEIZ": "已核实"}]
    response = upload(env, "reporter_a", CUSTOMERS, REAL_PERIOD, text_file(CUSTOMERS, rows))
    assert response.status_code == 201, response.text
    complete = [{**customer_row(number, REAL_PERIOD), "BEIZ": "完整"} for number in (1, 2, 3)]
    draft = env.client.post("/api/v1/submissions", headers=env.auth("reporter_a"),
                            data={"template_code": CUSTOMERS, "period_end": REAL_PERIOD, "draft": "true"},
                            files={"file": ("draft.txt", text_file(CUSTOMERS, complete), "text/plain")})
    assert draft.status_code == 201, draft.text
    return {"upload": response.json(), "draft": draft.json()}


def read_fields(env: Env, username: str, request_id: str | None = None, **params: Any) -> Any:
    headers = env.auth(username)
    if request_id:
        headers = {**headers, "X-Request-ID": request_id}
    return env.client.get("/api/v1/data-quality/fields", headers=headers, params=params)


def test_real_upload_stores_field_counts(env: Env, real_customers: dict[str, Any]) -> None:
    with env.db() as session:
        stored = session.get(SubmissionFieldCount, real_customers["upload"]["id"])

    assert real_customers["upload"]["state"] == "validation_failed"
    assert stored is not None
    assert (stored.row_count, stored.field_count, stored.required_field_count) == (3, CUSTOMER_FIELDS,
                                                                                  CUSTOMER_REQUIRED)
    assert (stored.present_values, stored.required_present_values) == (57, 50)
    assert len(stored.field_values) == CUSTOMER_FIELDS
    assert {code: count for code, count in stored.field_values.items() if count < 3} == {
        "ZCDZ": 2, "ZCZB": 2, "ZCZBBZ": 2, "CWLXRSJ": 2, "BEIZ": 1}


def test_real_upload_grouped(env: Env, real_customers: dict[str, Any]) -> None:
    body = ok(read(env, "analyst", institution="bank_a", template_code=CUSTOMERS, period_from=REAL_PERIOD,
                   period_to=REAL_PERIOD))

    assert [field_measures(row) for row in body["rows"]] == [(1, 1, 63, 57, 51, 50)]
    assert body["rows"][0]["field_completeness"] == pytest.approx(57 / 63)
    assert body["rows"][0]["required_field_completeness"] == pytest.approx(50 / 51)


def test_field_breakdown_lowest_first(env: Env, real_customers: dict[str, Any]) -> None:
    request_id = f"dq-{secrets.token_hex(6)}"

    body = ok(read_fields(env, "analyst", request_id, institution="bank_a", template_code=CUSTOMERS,
                          period=REAL_PERIOD))

    assert (body["submission_id"], body["version"], body["rows"], body["counted"]) == (
        real_customers["upload"]["id"], 1, 3, True)
    assert body["field_completeness"] == pytest.approx(57 / 63)
    assert body["required_field_completeness"] == pytest.approx(50 / 51)
    assert [(item["code"], item["present"]) for item in body["fields"][:6]] == [
        ("BEIZ", 1), ("ZCDZ", 2), ("ZCZB", 2), ("ZCZBBZ", 2), ("CWLXRSJ", 2), ("JRXKZH", 3)]
    assert body["fields"][1] == {"code": "ZCDZ", "name": "注册地址", "required": True, "present": 2, "rows": 3,
                                 "completeness": pytest.approx(2 / 3)}
    assert len(body["fields"]) == CUSTOMER_FIELDS
    assert [(item.action, item.outcome, item.resource) for item in audit_events(env, request_id)] == [
        ("quality.read", "success", f"submission:{real_customers['upload']['id']}")]


def test_field_breakdown_own_institution(env: Env, real_customers: dict[str, Any]) -> None:
    body = ok(read_fields(env, "reporter_a", template_code=CUSTOMERS, period=REAL_PERIOD))

    # The institution's own draft is newer, but a draft is not submitted, so version 1 still counts.
    assert (body["institution"], body["version"]) == ("bank_a", 1)
    assert body["submission_id"] != real_customers["draft"]["id"]


def test_field_breakdown_without_counts(env: Env, field_counts: dict[str, int]) -> None:
    body = ok(read_fields(env, "analyst", institution="dq_a", template_code=TEMPLATE, period="20180228"))

    assert (body["counted"], body["fields"]) == (False, [])
    assert body["field_completeness"] is None
    assert body["required_field_completeness"] is None


@pytest.mark.parametrize("username", ["reporter_a", "instadmin_a"])
def test_field_breakdown_other_institution_denied(env: Env, field_counts: dict[str, int], username: str) -> None:
    request_id = f"dq-{secrets.token_hex(6)}"

    response = read_fields(env, username, request_id, institution="dq_a", template_code=TEMPLATE, period="20180131")

    assert response.status_code == 403
    assert response.json()["code"] == "INSTITUTION_FORBIDDEN"
    assert [(item.action, item.outcome) for item in audit_events(env, request_id)] == [("quality.read", "denied")]


def test_field_breakdown_denied_to_modeller(env: Env) -> None:
    response = read_fields(env, "modeller_a", template_code=TEMPLATE, period="20180131")

    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"


@pytest.mark.parametrize(("params", "status", "code"), [
    ({"template_code": TEMPLATE, "period": "20180131"}, 422, "INSTITUTION_MISSING"),
    ({"institution": "zz_missing", "template_code": TEMPLATE, "period": "20180131"}, 422, "INSTITUTION_NOT_FOUND"),
    ({"institution": "dq_a", "period": "20180131"}, 422, "TEMPLATE_MISSING"),
    ({"institution": "dq_a", "template_code": "NO_SUCH", "period": "20180131"}, 422, "TEMPLATE_NOT_FOUND"),
    ({"institution": "dq_a", "template_code": TEMPLATE}, 422, "PERIOD_MISSING"),
    ({"institution": "dq_a", "template_code": TEMPLATE, "period": "2018-01-31"}, 422, "PERIOD_INVALID"),
    ({"institution": "dq_c", "template_code": TEMPLATE, "period": "20180131"}, 404, "QUALITY_REPORT_NOT_FOUND"),
    # dq_b's only version of P2 is a draft, which regulators must not see.
    ({"institution": "dq_b", "template_code": TEMPLATE, "period": "20180228"}, 404, "QUALITY_REPORT_NOT_FOUND"),
])
def test_field_breakdown_bad_request(env: Env, field_counts: dict[str, int], params: dict[str, Any], status: int,
                                     code: str) -> None:
    request_id = f"dq-{secrets.token_hex(6)}"

    response = read_fields(env, "analyst", request_id, **params)

    assert response.status_code == status, response.text
    assert response.json()["code"] == code
    assert [(item.action, item.outcome) for item in audit_events(env, request_id)] == [("quality.read", "failed")]


# --- access ------------------------------------------------------------------------------------------


def test_institution_user_sees_own(env: Env, small: dict[str, int]) -> None:
    body = ok(read(env, "reporter_a"))

    assert {row["institution"] for row in body["rows"]} == {"bank_a"}
    assert measures(body["total"])[:3] == (1, 0, 0)


@pytest.mark.parametrize("username", ["reporter_a", "instadmin_a"])
def test_other_institution_denied(env: Env, small: dict[str, int], username: str) -> None:
    request_id = f"dq-{secrets.token_hex(6)}"

    response = read(env, username, request_id, institution="dq_a")

    assert response.status_code == 403
    assert response.json()["code"] == "INSTITUTION_FORBIDDEN"
    assert [(item.action, item.outcome) for item in audit_events(env, request_id)] == [("quality.read", "denied")]


@pytest.mark.parametrize("username", ["modeller_a", "sysadmin", "secadmin", "auditor"])
def test_roles_without_capability_denied(env: Env, username: str) -> None:
    response = read(env, username)

    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"


def test_read_audited(env: Env, small: dict[str, int]) -> None:
    request_id = f"dq-{secrets.token_hex(6)}"

    ok(read(env, "reviewer", request_id, template_code=TEMPLATE))

    events = audit_events(env, request_id)
    assert [(item.action, item.outcome, item.resource) for item in events] == [
        ("quality.read", "success", "data_quality")]


@pytest.mark.parametrize(("params", "code"), [
    ({"period_from": "2018-01-01"}, "PERIOD_INVALID"),
    ({"period_from": "20181231", "period_to": "20180101"}, "PERIOD_INVALID"),
    ({"group_by": ["branch"]}, "GROUP_INVALID"),
    ({"template_code": "NO_SUCH"}, "TEMPLATE_NOT_FOUND"),
    ({"institution": "zz_missing"}, "INSTITUTION_NOT_FOUND"),
    ({"sort": "speed"}, "SORT_INVALID"),
])
def test_bad_filter_rejected(env: Env, params: dict[str, Any], code: str) -> None:
    request_id = f"dq-{secrets.token_hex(6)}"

    response = read(env, "analyst", request_id, **params)

    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert [(item.action, item.outcome) for item in audit_events(env, request_id)] == [("quality.read", "failed")]


# --- console -----------------------------------------------------------------------------------------


def test_console_page(env: Env, small: dict[str, int]) -> None:
    cookie = console_cookie(env, "analyst")

    page = env.client.get("/console/data-quality", headers=cookie,
                          params={**SMALL, "institution": "dq_b", "group_by": ["institution"]})
    bad = env.client.get("/console/data-quality", headers=cookie, params={"period_from": "2018"})

    assert page.status_code == 200
    assert 'id="nav-data-quality"' in page.text
    assert '<td class="validity">85.0%</td>' in page.text
    assert '<td class="timeliness">0.0%</td>' in page.text
    assert bad.status_code == 422
    assert "起始报告期" in bad.text


def test_console_page_field_columns(env: Env, field_counts: dict[str, int]) -> None:
    cookie = console_cookie(env, "analyst")

    page = env.client.get("/console/data-quality", headers=cookie, params={**SMALL, "template_code": TEMPLATE})

    assert page.status_code == 200
    assert "<th>报送完整性</th>" in page.text
    assert '<td class="field-completeness">75.0%</td>' in page.text
    assert '<td class="required-completeness">90.0%</td>' in page.text
    assert '<td class="field-completeness">82.5%</td>' in page.text  # the totals row
    assert 'id="field-version-rule"' in page.text
    assert "institution=dq_b&amp;template_code=EAST_DGKHXXB&amp;period_from=20180131&amp;period_to=20180131" in page.text
    assert 'id="quality-fields"' not in page.text


def test_console_page_field_breakdown(env: Env, real_customers: dict[str, Any], field_counts: dict[str, int]) -> None:
    cookie = console_cookie(env, "reviewer")
    one_report = {"institution": "bank_a", "template_code": CUSTOMERS, "period_from": REAL_PERIOD,
                  "period_to": REAL_PERIOD}

    page = env.client.get("/console/data-quality", headers=cookie, params=one_report)
    legacy = env.client.get("/console/data-quality", headers=cookie, params={
        "institution": "dq_a", "template_code": TEMPLATE, "period_from": "20180228", "period_to": "20180228"})

    assert page.status_code == 200
    assert '<strong id="breakdown-field">90.5%</strong>' in page.text
    assert '<strong id="breakdown-required">98.0%</strong>' in page.text
    assert page.text.count('<tr class="field-row">') == console_data_quality.LOWEST_FIELDS
    assert page.text.index("<code>BEIZ</code>") < page.text.index("<code>ZCDZ</code>")
    assert legacy.status_code == 200
    assert "上传时尚未统计字段非空值" in legacy.text
    assert '<td class="field-completeness">—</td>' in legacy.text


def test_console_page_denied_to_modeller(env: Env) -> None:
    cookie = console_cookie(env, "modeller_a")

    assert env.client.get("/console/data-quality", headers=cookie).status_code == 403


def test_console_walkthrough_in_chromium(env: Env, field_counts: dict[str, int],
                                        served_admin_api: str) -> None:  # noqa: F811
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{served_admin_api}/console/login")
            page.fill("input[name=username]", "analyst")
            page.fill("input[name=password]", env.passwords["analyst"])
            page.click("button[type=submit]")
            page.wait_for_load_state()
            page.click("header a:has-text('数据质量')")
            page.wait_for_load_state()

            page.select_option("#quality-institution", "dq_b")
            page.fill("input[name=period_from]", "20180101")
            page.fill("input[name=period_to]", "20181231")
            page.uncheck("input[name=group_by][value=template]")
            page.uncheck("input[name=group_by][value=period]")
            page.click("#quality-submit")
            page.wait_for_load_state()

            table = page.locator("#quality-table")
            assert table.locator("thead th").all_inner_texts()[:2] == ["机构代码", "机构名称"]
            assert table.locator("tbody tr").count() == 1
            assert table.locator("tbody td.completeness").inner_text() == "50.0%"
            assert table.locator("tbody td.validity").inner_text() == "85.0%"
            assert table.locator("tbody td.timeliness").inner_text() == "0.0%"
            assert table.locator("tbody td.field-completeness").inner_text() == "75.0%"
        finally:
            browser.close()


# --- validation findings of a real upload ------------------------------------------------------------


def test_real_upload_counts_error_rows(env: Env, bank_a_licence: None) -> None:  # noqa: F811
    period = "20190630"
    customers = upload(env, "reporter_a", "EAST_DGKHXXB", period,
                       text_file("EAST_DGKHXXB", [customer_row(1, period)]))
    assert customers.status_code == 201, customers.text
    loans = upload(env, "reporter_a", "EAST_DGXDYWJJB", period,
                   text_file("EAST_DGXDYWJJB", [loan_row(1, period, MXKMBH="=1+2"), loan_row(2, period)]))
    assert loans.status_code == 201, loans.text
    assert loans.json()["error_count"] >= 4

    body = ok(read(env, "analyst", institution="bank_a", period_from=period, period_to=period,
                   template_code="EAST_DGXDYWJJB"))

    # At least four errors on the two loan rows (the bad 明细科目编号, loan 2's customer missing from the
    # batch, both contracts missing), and each row counts once.
    assert [measures(row) for row in body["rows"]] == [(0, 0, 0, 1, 2, 2)]
    assert body["rows"][0]["validity"] == 0.0


# --- 400 institutions × 20 tasks ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def large(env: Env) -> dict[str, Any]:
    """400 institutions and 20 past tasks of year LARGE_YEAR, every target submitted once.

    Target ``(i, t)`` is on time unless ``(i + t) % 4 == 0`` (late). Every upload has 10 rows; those
    with ``(i + t) % 10 == 0`` have a findings file with errors on 2 rows (3 findings), the others none.
    Every upload has 5 fields, 3 of them required: 50 − (i + t) % 3 non-empty values, 30 − (i + t) % 2 required.
    """
    codes = [f"dql{index:03d}" for index in range(INSTITUTION_COUNT)]
    periods = [date(LARGE_YEAR, 1, 1) + timedelta(days=7 * number) for number in range(TASK_COUNT)]
    with env.db() as session:
        seed = Seeder.for_user(session, "reporter_a")
        ids = seed.institutions(codes)
        for number, period in enumerate(periods):
            deadline = datetime.combine(period, datetime.min.time(), UTC) + timedelta(days=10)
            seed.task(TEMPLATE, period, deadline, list(ids.values()))
            for index, code in enumerate(codes):
                at = deadline + (DAY if (index + number) % 4 == 0 else -DAY)
                seed.uploads(ids[code], TEMPLATE, period, [Upload("accepted", [("pending_review", at),
                                                                               ("accepted", at + DAY)])])
        seed.flush()
        session.commit()
        submissions = session.execute(select(ReportSubmission.id, ReportSubmission.institution_id,
                                             ReportSubmission.period_end)
                                      .where(ReportSubmission.institution_id.in_(ids.values()))).all()
    index_of = {institution_id: codes.index(code) for code, institution_id in ids.items()}
    changes = []
    for submission_id, institution_id, period in submissions:
        if (index_of[institution_id] + periods.index(period)) % 10 == 0:
            findings = write_findings(env, f"large-{submission_id}", [(3, "error"), (3, "error"), (8, "error")])
            changes.append({"id": submission_id, "row_count": 10, "error_count": 3, "findings_path": findings})
        else:
            # Uploads without errors are counted without reading their findings, so this file need not exist.
            changes.append({"id": submission_id, "row_count": 10, "error_count": 0,
                            "findings_path": f"intake/unread/{submission_id}"})
    with env.db() as session:
        session.execute(update(ReportSubmission), changes)
        session.commit()
    with_errors = sum(1 for change in changes if change["error_count"])
    add_field_counts(env, [(submission_id, 10, 5, 3, 50 - (index_of[institution_id] + periods.index(period)) % 3,
                            30 - (index_of[institution_id] + periods.index(period)) % 2)
                           for submission_id, institution_id, period in submissions])
    return {"codes": codes, "with_errors": with_errors}


def test_large_dataset_grouped(env: Env, large: dict[str, Any]) -> None:
    engine = env.session_factory.kw["bind"]
    statements: list[str] = []

    def listener(*arguments: Any) -> None:
        statements.append(arguments[2])

    quality_filter = data_quality.QualityFilter(period_from=date(LARGE_YEAR, 1, 1),
                                                period_to=date(LARGE_YEAR, 12, 31), group_by=("institution",))
    event.listen(engine, "before_cursor_execute", listener)
    try:
        with env.db() as session:
            report = data_quality.quality_report(session, env.settings, quality_filter, limit=500)
    finally:
        event.remove(engine, "before_cursor_execute", listener)

    targets = INSTITUTION_COUNT * TASK_COUNT
    late = sum(1 for index in range(INSTITUTION_COUNT) for number in range(TASK_COUNT) if (index + number) % 4 == 0)
    assert report.group_count == INSTITUTION_COUNT
    assert (report.total.expected, report.total.received, report.total.on_time) == (targets, targets, targets - late)
    assert (report.total.uploads, report.total.rows_validated) == (targets, 10 * targets)
    assert report.total.rows_with_errors == 2 * large["with_errors"]
    first = next(row for row in report.rows if row.institution == "dql000")
    assert (first.expected, first.on_time, first.rows_with_errors) == (20, 15, 4)
    pairs = [(index, number) for index in range(INSTITUTION_COUNT) for number in range(TASK_COUNT)]
    assert (report.total.reports, report.total.field_reports, report.total.cells) == (targets, targets, 50 * targets)
    assert report.total.present_values == sum(50 - (i + t) % 3 for i, t in pairs)
    assert report.total.required_present_values == sum(30 - (i + t) % 2 for i, t in pairs)
    assert first.present_values == sum(50 - t % 3 for t in range(TASK_COUNT))
    assert len(statements) == 4
