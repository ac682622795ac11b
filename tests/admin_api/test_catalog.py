"""数据目录: sync from templates and sampled warehouse values, steward classification, history, audit, denials."""

from __future__ import annotations

import json
import secrets
import shutil
import stat
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faker import Faker
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from admin_api import catalog_sync, manage
from admin_api.catalog_sync import sync_at_start, sync_catalog
from admin_api.models import AuditEvent, CatalogColumn, CatalogColumnHistory, Institution, ReportSubmission, User
from admin_api.submissions import catalog as template_catalog
from catalog.classes import ColumnClass
from extracts.cli import read_classes_file
from intake.template_model import TEMPLATES_DIR, TemplateCatalog
from intake.warehouse import load_submission

from ..catalog.test_detectors import resident_id
from .conftest import BACKENDS, Env, backend_env
from .helpers import audit_events, console_cookie

COLUMNS = "/api/v1/catalog/columns"


@pytest.fixture(scope="module", params=BACKENDS)
def catalog_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from backend_env(request.param, tmp_path_factory, "catalog")


def request_id() -> str:
    return f"cat-{secrets.token_hex(6)}"


def column(env: Env, table: str, code: str, user: str = "steward") -> dict:
    response = env.client.get(f"{COLUMNS}/{table}/{code}", headers=env.auth(user))
    assert response.status_code == 200, response.text
    return response.json()


def classify(env: Env, table: str, code: str, body: dict, user: str = "steward",  # noqa: ANN201
             rid: str | None = None):
    headers = {**env.auth(user), **({"X-Request-ID": rid} if rid else {})}
    return env.client.post(f"{COLUMNS}/{table}/{code}/classification", json=body, headers=headers)


# --- sync ------------------------------------------------------------------------------------------


def test_sync_at_start_covers_every_field(catalog_env: Env) -> None:
    response = catalog_env.client.get("/api/v1/catalog/tables", headers=catalog_env.auth("steward"))

    assert response.status_code == 200
    tables = {item["table_code"]: item for item in response.json()}
    for template in template_catalog().all():
        assert tables[template.code]["columns"] == len(template.fields), template.code
        assert tables[template.code]["template_name"] == template.name
    with catalog_env.db() as session:
        rows = session.scalars(select(CatalogColumn)).all()
        history = session.scalars(select(CatalogColumnHistory)).all()
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "catalog.sync")).all()
    assert {row.version for row in rows} == {1}
    assert len([item for item in history if item.change == "created"]) == len(rows)
    assert events[0].actor == "admin_api:catalog-sync"


def test_sync_again_changes_nothing(catalog_env: Env) -> None:
    with catalog_env.db() as session:
        result = sync_catalog(session, template_catalog())
        session.commit()

    assert (result.created, result.updated, result.sampled_tables) == (0, 0, [])


def test_proposals_of_key_fields(catalog_env: Env) -> None:
    resident = column(catalog_env, "EAST_DGKHXXB", "FDDBRZJHM")
    customer = column(catalog_env, "EAST_DGKHXXB", "KHMC")

    assert resident["proposed"]["kind"] == "resident_id"
    assert (resident["proposed"]["level"], resident["proposed"]["pi_category"]) == (4, "C2")
    assert {item["source"] for item in resident["evidence"]} == {"name", "rule_check"}
    assert customer["proposed"]["kind"] == "org_name"
    assert resident["template_code"] == "EAST_DGKHXXB"
    assert resident["template_version"] == 1
    assert resident["name"] == "法定代表人证件号码"


def test_unconfirmed_effective_level_four(catalog_env: Env) -> None:
    licence = column(catalog_env, "EAST_DBHTB", "JRXKZH")

    assert licence["proposed"]["level"] == 1
    assert licence["confirmed"] is None
    assert licence["effective"]["level"] == 4
    assert licence["effective"]["kind"] == "licence_no"


def test_level_filter_uses_effective_level(catalog_env: Env) -> None:
    level_one = catalog_env.client.get(COLUMNS, params={"level": 1, "table_code": "EAST_DBHTB"},
                                       headers=catalog_env.auth("analyst"))
    level_four = catalog_env.client.get(COLUMNS, params={"level": 4, "table_code": "EAST_DBHTB"},
                                        headers=catalog_env.auth("analyst"))

    assert level_one.status_code == 200
    assert level_one.json() == []
    codes = {item["column_code"] for item in level_four.json()}
    assert "JRXKZH" in codes
    assert int(level_four.headers["X-Total-Count"]) == len(codes)


def test_search_by_text_and_category(catalog_env: Env) -> None:
    by_name = catalog_env.client.get(COLUMNS, params={"q": "证件号码"}, headers=catalog_env.auth("reviewer"))
    personal = catalog_env.client.get(COLUMNS, params={"category": "C2", "table_code": "EAST_DGKHXXB"},
                                      headers=catalog_env.auth("reviewer"))
    not_personal = catalog_env.client.get(COLUMNS, params={"category": "none", "table_code": "G01"},
                                          headers=catalog_env.auth("reviewer"))

    assert {item["column_code"] for item in by_name.json()} >= {"ZJHM", "FDDBRZJHM", "DBRZJHM"}
    assert {"FDDBRZJHM", "CWLXRSJ", "FDDBRXM"} <= {item["column_code"] for item in personal.json()}
    assert len(not_personal.json()) == len(template_catalog().get("G01").fields)


def test_review_queue_lists_unconfirmed(catalog_env: Env) -> None:
    response = catalog_env.client.get("/api/v1/catalog/review-queue", params={"table_code": "EAST_STZFXXB"},
                                      headers=catalog_env.auth("steward"))

    assert response.status_code == 200
    assert all(item["confirmed"] is None for item in response.json())
    assert all(item["evidence"] for item in response.json())


# --- classification --------------------------------------------------------------------------------


def test_steward_confirms_with_history_and_audit(catalog_env: Env) -> None:
    before = column(catalog_env, "EAST_DGKHXXB", "ZJHM")
    rid = request_id()

    response = classify(catalog_env, "EAST_DGKHXXB", "ZJHM",
                        {"level": 2, "kind": "uscc", "version": before["version"], "data_owner": "统计信息部"},
                        rid=rid)

    assert response.status_code == 200, response.text
    detail = response.json()
    assert detail["confirmed"]["kind"] == "uscc"
    assert detail["confirmed_by"] == "steward"
    assert detail["effective"]["level"] == 2
    assert detail["data_owner"] == "统计信息部"
    assert detail["version"] == before["version"] + 1
    assert detail["history"][0]["change"] == "confirmed"
    assert detail["history"][0]["snapshot"]["confirmed"] == {"level": 2, "pi_category": None, "kind": "uscc"}
    assert detail["history"][-1]["change"] == "created"
    events = audit_events(catalog_env, rid)
    assert [(event.action, event.outcome) for event in events] == [("catalog.confirm", "success")]
    assert events[0].resource == "catalog:EAST_DGKHXXB.ZJHM"
    assert json.loads(events[0].detail)["to"]["kind"] == "uscc"


def test_change_confirmed_needs_reason(catalog_env: Env) -> None:
    first = classify(catalog_env, "EAST_DGKHXXB", "CWLXRSJ", {"level": 3, "pi_category": "C2", "kind": "mobile"})
    assert first.status_code == 200
    rid = request_id()

    refused = classify(catalog_env, "EAST_DGKHXXB", "CWLXRSJ", {"level": 4, "pi_category": "C2", "kind": "mobile"},
                       rid=rid)
    changed = classify(catalog_env, "EAST_DGKHXXB", "CWLXRSJ",
                       {"level": 4, "pi_category": "C2", "kind": "mobile", "reason": "财务联系人手机号可关联法定代表人"})

    assert refused.status_code == 422
    assert refused.json()["code"] == "CATALOG_REASON_REQUIRED"
    assert "变更原因" in refused.json()["detail"]
    assert [(event.action, event.outcome) for event in audit_events(catalog_env, rid)] == [
        ("catalog.classify", "failed")]
    assert changed.status_code == 200
    detail = changed.json()
    assert detail["version"] == first.json()["version"] + 1
    assert detail["history"][0]["change"] == "changed"
    assert detail["history"][0]["reason"] == "财务联系人手机号可关联法定代表人"
    assert detail["history"][1]["snapshot"]["confirmed"]["level"] == 3


def test_same_class_again_conflict(catalog_env: Env) -> None:
    body = {"level": 2, "kind": "org_name"}
    assert classify(catalog_env, "EAST_DGXDYWJJB", "YHJGMC", body).status_code == 200

    again = classify(catalog_env, "EAST_DGXDYWJJB", "YHJGMC", body)

    assert again.status_code == 409
    assert again.json()["code"] == "CATALOG_UNCHANGED"


def test_stale_version_conflict(catalog_env: Env) -> None:
    current = column(catalog_env, "EAST_DGXDYWJJB", "JJH")

    response = classify(catalog_env, "EAST_DGXDYWJJB", "JJH",
                        {"level": 3, "pi_category": "C1", "kind": "contract_no", "version": current["version"] + 5})

    assert response.status_code == 409
    assert response.json()["code"] == "CATALOG_VERSION_CONFLICT"
    assert column(catalog_env, "EAST_DGXDYWJJB", "JJH")["version"] == current["version"]


@pytest.mark.parametrize(("body", "code", "words"), [
    ({"level": 7, "kind": "other"}, "CATALOG_LEVEL_INVALID", "安全级别 7"),
    ({"level": 0, "kind": "other"}, "CATALOG_LEVEL_INVALID", "安全级别 0"),
    ({"level": 3, "pi_category": "C3", "kind": "auth_secret"}, "CATALOG_LEVEL_BELOW_CATEGORY", "不能低于 4 级"),
    ({"level": 2, "pi_category": "C2", "kind": "mobile"}, "CATALOG_LEVEL_BELOW_CATEGORY", "不能低于 3 级"),
    ({"level": 4, "pi_category": "C9", "kind": "other"}, "CATALOG_CATEGORY_INVALID", "C9"),
    ({"level": 4, "kind": "passport"}, "CATALOG_KIND_INVALID", "passport"),
    ({"level": 4, "pi_category": "C2", "kind": "auth_secret"}, "CATALOG_AUTH_SECRET_NOT_C3", "C3"),
])
def test_bad_classification_rejected(catalog_env: Env, body: dict, code: str, words: str) -> None:
    before = column(catalog_env, "EAST_DBHTB", "BEIZ")

    response = classify(catalog_env, "EAST_DBHTB", "BEIZ", body)

    assert response.status_code == 422
    assert response.json()["code"] == code
    assert words in response.json()["detail"]
    assert column(catalog_env, "EAST_DBHTB", "BEIZ")["version"] == before["version"]


def test_unknown_column_not_found(catalog_env: Env) -> None:
    read = catalog_env.client.get(f"{COLUMNS}/EAST_DBHTB/NOPE", headers=catalog_env.auth("steward"))
    write = classify(catalog_env, "NO_TABLE", "ZJHM", {"level": 4, "kind": "other"})

    assert read.status_code == 404
    assert read.json()["code"] == "CATALOG_COLUMN_NOT_FOUND"
    assert "EAST_DBHTB.NOPE" in read.json()["detail"]
    assert write.status_code == 404
    assert write.json()["code"] == "CATALOG_COLUMN_NOT_FOUND"


def test_bad_filter_rejected(catalog_env: Env) -> None:
    response = catalog_env.client.get(COLUMNS, params={"level": 9}, headers=catalog_env.auth("steward"))
    kind = catalog_env.client.get(COLUMNS, params={"kind": "nothing"}, headers=catalog_env.auth("steward"))

    assert response.status_code == 422
    assert response.json()["code"] == "CATALOG_LEVEL_INVALID"
    assert kind.json()["code"] == "CATALOG_KIND_INVALID"


@pytest.mark.parametrize(("user", "status"), [("reporter_a", 403), ("instadmin_a", 403), ("modeller_a", 403),
                                              ("sysadmin", 403), ("secadmin", 403), ("auditor", 403)])
def test_catalog_read_denied(catalog_env: Env, user: str, status: int) -> None:
    response = catalog_env.client.get(COLUMNS, headers=catalog_env.auth(user))

    assert response.status_code == status
    assert response.json()["code"] == "FORBIDDEN"


@pytest.mark.parametrize("user", ["reviewer", "analyst", "sysadmin", "secadmin", "reporter_a"])
def test_classify_denied_without_steward(catalog_env: Env, user: str) -> None:
    rid = request_id()
    before = column(catalog_env, "EAST_DBHTB", "DBJE")

    response = classify(catalog_env, "EAST_DBHTB", "DBJE", {"level": 3, "pi_category": "C1", "kind": "amount"},
                        user=user, rid=rid)

    assert response.status_code == 403
    assert response.json()["code"] == "FORBIDDEN"
    assert [(event.action, event.outcome) for event in audit_events(catalog_env, rid)] == [
        ("catalog.classify", "denied")]
    assert column(catalog_env, "EAST_DBHTB", "DBJE")["version"] == before["version"]


def test_anonymous_denied(catalog_env: Env) -> None:
    read = catalog_env.client.get(COLUMNS)
    write = catalog_env.client.post(f"{COLUMNS}/EAST_DBHTB/DBJE/classification", json={"level": 3, "kind": "amount"})

    assert read.status_code == 401
    assert write.status_code == 401
    assert write.json()["code"] == "NOT_AUTHENTICATED"


def test_history_append_only(catalog_env: Env) -> None:
    with catalog_env.db() as session:
        with pytest.raises(DBAPIError):
            session.execute(text("UPDATE catalog_column_history SET actor = 'someone'"))
        session.rollback()
        with pytest.raises(DBAPIError):
            session.execute(text("DELETE FROM catalog_column_history"))
        session.rollback()


def test_lineage_extract_not_built(catalog_env: Env) -> None:
    response = catalog_env.client.get(f"{COLUMNS}/EAST_XDHTB/HTJE/lineage", headers=catalog_env.auth("reviewer"))

    assert response.status_code == 200
    lineage = response.json()
    assert lineage["template"]["code"] == "EAST_XDHTB"
    assert lineage["template"]["versions"] == [1]
    assert lineage["warehouse"]["table"] == "intake/EAST_XDHTB"
    assert lineage["extracts"]["status"] == "not_built"


def test_custom_role_steward_with_admin_duty(catalog_env: Env) -> None:
    body = {"code": f"r_{secrets.token_hex(3)}", "name": f"治理{secrets.token_hex(3)}", "scope": "regulator",
            "capabilities": ["catalog.classify", "keys.operate"]}

    response = catalog_env.client.post("/api/v1/roles", json=body, headers=catalog_env.auth("sysadmin"))

    assert response.status_code == 409
    assert response.json()["code"] == "ROLE_STEWARD_SEPARATION"


# --- sampled values --------------------------------------------------------------------------------


def _accepted_partition(env: Env, template_code: str, institution_code: str, period_end: date,
                        rows: dict[str, list[str]], work: Path) -> None:
    """Store an accepted submission row and load ``rows`` as its warehouse partition, like an accept does."""
    template = template_catalog().get(template_code)
    staged = work / "staged.parquet"
    pq.write_table(pa.table({code: pa.array(values, pa.string()) for code, values in rows.items()}), staged)
    count = len(next(iter(rows.values())))
    with env.db() as session:
        institution_id = session.scalars(select(Institution.id).where(Institution.code == institution_code)).one()
        reporter_id = session.scalars(select(User.id).where(User.username == "reporter_c")).one()
        row = ReportSubmission(
            institution_id=institution_id, template_code=template_code, template_version=template.version,
            template_digest=template.digest, period_end=period_end, version=1, state="accepted",
            original_filename="test.txt", file_type="text", encoding="utf-8", byte_size=1, raw_sm3="0" * 64,
            raw_path="", key_version=1, row_count=count, submitted_by=reporter_id)
        session.add(row)
        session.flush()
        outcome = load_submission(env.settings, env.client.app.state.keystore, institution_code=institution_code,
                                  template_code=template_code, template_version=template.version,
                                  field_codes=[item.code for item in template.fields], period_end=period_end,
                                  staged_path=staged, submission_id=row.id, version=1, raw_sm3="0" * 64)
        session.commit()
        outcome.finish()


def test_sync_samples_accepted_values(catalog_env: Env, tmp_path: Path) -> None:
    fake = Faker("zh_CN")
    fake.seed_instance(99)
    companies = [fake.company() for _ in range(40)]
    _accepted_partition(catalog_env, "EAST_XDHTB", "bank_c", date(2019, 12, 31),
                        {"KHMC": companies, "HTH": [f"HT{index:06d}" for index in range(40)]}, tmp_path)
    assert classify(catalog_env, "EAST_XDHTB", "KHMC",
                    {"level": 3, "pi_category": "C2", "kind": "person_name"}).status_code == 200
    rid = request_id()

    response = catalog_env.client.post("/api/v1/catalog/sync", json={"table_code": "EAST_XDHTB"},
                                       headers={**catalog_env.auth("steward"), "X-Request-ID": rid})

    assert response.status_code == 200, response.text
    assert response.json()["sampled_tables"] == ["EAST_XDHTB"]
    customer = column(catalog_env, "EAST_XDHTB", "KHMC")
    assert customer["proposed"]["kind"] == "org_name"
    assert customer["confirmed"]["kind"] == "person_name"
    assert customer["mismatch"] is True
    assert customer["sampled_at"] is not None
    values = [item for item in customer["evidence"] if item["source"] == "values"]
    assert (values[0]["matched"], values[0]["sampled"]) == (40, 40)
    assert customer["history"][0]["change"] == "proposed"
    with catalog_env.db() as session:
        stored = json.dumps([row.evidence for row in session.scalars(select(CatalogColumn))], ensure_ascii=False)
        history = json.dumps([row.snapshot for row in session.scalars(select(CatalogColumnHistory))],
                             ensure_ascii=False)
    events = audit_events(catalog_env, rid)
    assert [(event.action, event.outcome) for event in events] == [("catalog.sync", "success")]
    for company in companies:
        assert company not in stored
        assert company not in history
        assert company not in (events[0].detail or "")
    assert not list(catalog_env.settings.data_dir.glob(".catalog-sample-*"))


def test_sync_unknown_table(catalog_env: Env) -> None:
    response = catalog_env.client.post("/api/v1/catalog/sync", json={"table_code": "NO_SUCH"},
                                       headers=catalog_env.auth("steward"))

    assert response.status_code == 404
    assert response.json()["code"] == "CATALOG_TABLE_NOT_FOUND"


def test_search_wildcards_literal(catalog_env: Env) -> None:
    percent = catalog_env.client.get(COLUMNS, params={"q": "%"}, headers=catalog_env.auth("steward"))
    underscore = catalog_env.client.get(COLUMNS, params={"q": "DGKHXXB_"}, headers=catalog_env.auth("steward"))

    assert [item["column_code"] for item in percent.json()] == ["SJLL"]  # its description is "4.35 表示 4.35%"
    assert underscore.json() == []


def test_new_template_version_reopens_changed_field(catalog_env: Env, tmp_path: Path) -> None:
    confirmed = classify(catalog_env, "EAST_STZFXXB", "ZFYT", {"level": 3, "pi_category": "C1", "kind": "free_text"})
    assert confirmed.status_code == 200
    kept = classify(catalog_env, "EAST_STZFXXB", "STZFJE", {"level": 3, "pi_category": "C1", "kind": "amount"})
    assert kept.status_code == 200
    folder = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, folder)
    source = (folder / "EAST_STZFXXB.v1.yaml").read_text("utf-8")
    added = "  - {code: SKRSJ, name: 收款人手机号码, type: text, length: 20, format: {check: mobile}}\n"
    renamed = "  - {code: ZFYT, name: 支付用途及收款人说明, type: text, length: 400, required: true}\n"
    version_two = source.replace("version: 1", "version: 2").replace(
        "  - {code: ZFYT, name: 支付用途, type: text, length: 400, required: true}\n", renamed + added)
    (folder / "EAST_STZFXXB.v2.yaml").write_text(version_two, "utf-8")

    with catalog_env.db() as session:
        result = sync_catalog(session, TemplateCatalog.load(folder), actor="steward")
        session.commit()

    assert result.created == 1
    new = column(catalog_env, "EAST_STZFXXB", "SKRSJ")
    assert new["proposed"]["kind"] == "mobile"
    assert new["template_version"] == 2
    reopened = column(catalog_env, "EAST_STZFXXB", "ZFYT")
    assert reopened["confirmed"] is None
    assert reopened["effective"]["level"] == 4
    assert reopened["name"] == "支付用途及收款人说明"
    assert reopened["history"][0]["change"] == "reopened"
    assert "须重新确认" in reopened["history"][0]["reason"]
    amount = column(catalog_env, "EAST_STZFXXB", "STZFJE")
    assert amount["confirmed"]["kind"] == "amount"
    assert amount["template_version"] == 2


def test_start_sync_retries_after_race(catalog_env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = catalog_sync.sync_catalog

    def racing(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 1:
            raise IntegrityError("INSERT", {}, Exception("duplicate key"))
        return original(*args, **kwargs)

    monkeypatch.setattr(catalog_sync, "sync_catalog", racing)
    with catalog_env.db() as session:
        result = catalog_sync.sync_at_start(session, catalog_env.settings, catalog_env.client.app.state.keystore,
                                            template_catalog())

    assert len(calls) == 2
    assert result.created == 0


def test_mismatch_filter_lists_recheck(catalog_env: Env) -> None:
    assert column(catalog_env, "EAST_DKWJXTBDB", "BDYY")["proposed"]["kind"] == "free_text"
    assert classify(catalog_env, "EAST_DKWJXTBDB", "BDYY", {"level": 2, "kind": "other"}).status_code == 200

    response = catalog_env.client.get(COLUMNS, params={"mismatch": "true"}, headers=catalog_env.auth("steward"))

    assert response.status_code == 200
    listed = {(item["table_code"], item["column_code"]) for item in response.json()}
    assert ("EAST_DKWJXTBDB", "BDYY") in listed
    assert all(item["mismatch"] for item in response.json())
    page = catalog_env.client.get("/console/catalog/review", headers=console_cookie(catalog_env, "steward"))
    assert "recheck-EAST_DKWJXTBDB-BDYY" in page.text


def test_non_integer_level_message(catalog_env: Env) -> None:
    response = classify(catalog_env, "EAST_DBHTB", "BEIZ", {"level": "高", "kind": "other"})
    missing = classify(catalog_env, "EAST_DBHTB", "BEIZ", {"level": 3})

    assert response.status_code == 422
    assert response.json()["code"] == "INVALID_REQUEST"
    assert "安全级别" in response.json()["detail"]
    assert "字段语义类型" in missing.json()["detail"]


def test_start_sync_samples_new_data(catalog_env: Env, tmp_path: Path) -> None:
    identifiers = [resident_id() for _ in range(30)]
    _accepted_partition(catalog_env, "EAST_DBHTB", "bank_b", date(2019, 12, 31),
                        {"DBRZJHM": identifiers, "DBRMC": ["担保人"] * 30}, tmp_path)
    with catalog_env.db() as session:
        result = sync_at_start(session, catalog_env.settings, catalog_env.client.app.state.keystore,
                               template_catalog())

    assert "EAST_DBHTB" in result.sampled_tables
    guarantor = column(catalog_env, "EAST_DBHTB", "DBRZJHM")
    values = [item for item in guarantor["evidence"] if item["source"] == "values"]
    assert (values[0]["kind"], values[0]["matched"], values[0]["sampled"]) == ("resident_id", 30, 30)
    with catalog_env.db() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "catalog.sync")
                                .order_by(AuditEvent.id.desc())).first()
    assert event.actor == "admin_api:catalog-sync"
    assert "EAST_DBHTB" in event.detail
    assert not any(number in event.detail for number in identifiers)


def test_manage_catalog_sync(catalog_env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _accepted_partition(catalog_env, "EAST_DBHTB", "bank_a", date(2018, 12, 31),
                        {"DBRZJHM": [resident_id() for _ in range(25)]}, tmp_path)

    status = manage.catalog_sync(catalog_env.settings, "EAST_DBHTB", resample=True)
    unknown = manage.catalog_sync(catalog_env.settings, "NO_SUCH", resample=False)

    captured = capsys.readouterr()
    assert status == 0
    assert json.loads(captured.out.splitlines()[0])["sampled_tables"] == ["EAST_DBHTB"]
    assert "数据目录已同步" in captured.err
    assert unknown == 1
    assert "数据表“NO_SUCH”不存在" in captured.err
    with catalog_env.db() as session:
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == "catalog.sync")
                                .order_by(AuditEvent.id.desc())).first()
    assert event.actor.startswith("cli:")
    assert event.role == "operator"
    assert event.resource == "catalog:EAST_DBHTB"


def test_manage_catalog_classes(catalog_env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    confirmed = classify(catalog_env, "EAST_DBHTB", "DBQSRQ", {"level": 2, "pi_category": None, "kind": "other"})
    assert confirmed.status_code == 200, confirmed.text
    out = tmp_path / "classes.json"

    status = manage.catalog_classes(catalog_env.settings, out)

    assert status == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    entries = {(entry["table"], entry["column"]): entry for entry in json.loads(out.read_text("utf-8"))}
    assert entries[("EAST_DBHTB", "DBQSRQ")] == {"table": "EAST_DBHTB", "column": "DBQSRQ", "level": 2,
                                                "pi_category": None, "kind": "other", "confirmed": True}
    unconfirmed = [entry for entry in entries.values() if not entry["confirmed"]]
    assert unconfirmed
    assert all(entry["level"] >= 4 for entry in unconfirmed)
    assert read_classes_file(out)[("EAST_DBHTB", "DBQSRQ")] == ColumnClass(2, None, "other")
    assert "已导出" in capsys.readouterr().err
