"""报表模板 API: listing, detail, download, check, upload and delete of template versions, and the denials.

The tests run against an environment of their own per database backend, because an uploaded
version joins the process-wide catalog. Uploaded templates are copies of the shipped
对公客户信息表 under a new random code, so they never change what the other modules submit.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from admin_api.models import AuditEvent
from admin_api.report_templates import configure_templates
from intake import template_store
from intake.template_model import TEMPLATES_DIR

from .conftest import BACKENDS, Env, backend_env
from .test_submissions import bank_a_licence  # noqa: F401  # module fixture: bank_a gets the test files' 金融许可证号
from .test_submissions import customer_row, text_file, upload

SOURCE = (TEMPLATES_DIR / "EAST_DGKHXXB.v1.yaml").read_text(encoding="utf-8")


def private_env(backend: str, tmp_path_factory: pytest.TempPathFactory, label: str) -> Iterator[Env]:
    """Yield an environment of its own; afterwards the process-wide catalog uses the folder it used before."""
    previous = template_store.configured_folder()
    try:
        yield from backend_env(backend, tmp_path_factory, label)
    finally:
        template_store.configure(previous)


@pytest.fixture(scope="module", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from private_env(request.param, tmp_path_factory, "templates")


def new_code() -> str:
    return f"ZT_KH{secrets.token_hex(4).upper()}"


def template_text(code: str, version: int = 1, text: str = SOURCE) -> str:
    """Return the shipped 对公客户信息表 as template ``code`` in ``version``."""
    changed = text.replace("code: EAST_DGKHXXB", f"code: {code}", 1).replace("version: 1", f"version: {version}", 1)
    assert changed != text
    return changed


def post_file(env: Env, path: str, content: str | bytes, user: str = "sysadmin", name: str = "template.yaml") -> Any:
    data = content.encode("utf-8") if isinstance(content, str) else content
    headers = env.auth(user) if user else {}
    return env.client.post(path, headers=headers, files={"file": (name, data, "application/yaml")})


def uploaded(env: Env, code: str, version: int = 1) -> dict[str, Any]:
    response = post_file(env, "/api/v1/templates", template_text(code, version))
    assert response.status_code == 201, response.text
    return response.json()


def added_files(env: Env) -> list[str]:
    return sorted(path.name for path in (env.settings.data_dir / "templates").iterdir())


def events(env: Env, action: str, resource: str) -> list[tuple[str, str | None]]:
    with env.db() as session:
        rows = session.scalars(select(AuditEvent).where(AuditEvent.action == action, AuditEvent.resource == resource)
                               .order_by(AuditEvent.id))
        return [(row.outcome, row.detail) for row in rows]


def test_list_and_detail_of_shipped(env: Env) -> None:
    listing = env.client.get("/api/v1/templates", headers=env.auth("reporter_a"))
    detail = env.client.get("/api/v1/templates/EAST_DGKHXXB/versions/1", headers=env.auth("reviewer"))

    assert listing.status_code == 200, listing.text
    codes = [item["code"] for item in listing.json()["templates"]]
    assert {"EAST_DGKHXXB", "EAST_XDHTB", "G01"} <= set(codes)
    assert listing.json()["broken_files"] == []
    customer = next(item for item in listing.json()["templates"] if item["code"] == "EAST_DGKHXXB")
    version = customer["versions"][0]
    assert (version["source"], version["source_name"], version["deletable"]) == ("shipped", "随系统发布", False)
    assert re.fullmatch(r"[0-9a-f]{64}", version["digest"])
    assert detail.status_code == 200, detail.text
    body = detail.json()
    field = next(item for item in body["fields"] if item["code"] == "ZCZB")
    assert (field["name"], field["type_name"], field["precision"], field["scale"], field["required"]) == (
        "注册资本", "数值", 20, 2, False)
    assert next(item for item in body["fields"] if item["code"] == "CJRQ")["role"] == "采集日期"
    assert body["primary_key"]
    assert {rule["severity_name"] for rule in body["rules"]} == {"错误", "提示"}
    assert any(rule["derived"] and rule["id"].startswith("AUTO-") for rule in body["rules"])
    assert {"compare", "not_null"} <= {rule["kind"] for rule in body["rules"]}
    assert any(item["name"] == "企业规模" and item["shared"] for item in body["code_lists"])


def test_search_filters_by_name(env: Env) -> None:
    response = env.client.get("/api/v1/templates", params={"q": "对公客户"}, headers=env.auth("analyst"))

    assert response.status_code == 200, response.text
    assert [item["code"] for item in response.json()["templates"]] == ["EAST_DGKHXXB"]


def test_download_yaml_audited(env: Env) -> None:
    response = env.client.get("/api/v1/templates/EAST_DGKHXXB/versions/1/yaml", headers=env.auth("reporter_a"))

    assert response.status_code == 200, response.text
    assert response.content == (TEMPLATES_DIR / "EAST_DGKHXXB.v1.yaml").read_bytes()
    assert 'filename="EAST_DGKHXXB.v1.yaml"' in response.headers["content-disposition"]
    assert ("success", ) == events(env, "templates.download", "template:EAST_DGKHXXB.v1")[-1][:1]


def test_unknown_version_404(env: Env) -> None:
    response = env.client.get("/api/v1/templates/EAST_DGKHXXB/versions/9", headers=env.auth("reviewer"))

    assert response.status_code == 404, response.text
    assert response.json()["code"] == "TEMPLATE_NOT_FOUND"
    assert "已有版本：1" in response.json()["detail"]


def test_upload_delete_roundtrip(env: Env) -> None:
    code = new_code()
    body = uploaded(env, code)

    assert (body["code"], body["version"], body["source"], body["deletable"]) == (code, 1, "added", True)
    folder = env.settings.data_dir / "templates"
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert f"{code}.v1.yaml" in added_files(env)
    assert events(env, "templates.upload", f"template:{code}.v1")[-1][0] == "success"
    listing = env.client.get("/api/v1/templates", params={"q": code}, headers=env.auth("reporter_a")).json()
    assert [item["code"] for item in listing["templates"]] == [code]
    # the submission code path sees the new version at once
    from admin_api.submissions import catalog

    assert catalog().versions(code) == (1,)

    deleted = env.client.delete(f"/api/v1/templates/{code}/versions/1", headers=env.auth("sysadmin"))
    assert deleted.status_code == 204, deleted.text
    assert f"{code}.v1.yaml" not in added_files(env)
    assert code not in catalog()
    assert events(env, "templates.delete", f"template:{code}.v1")[-1][0] == "success"


def test_check_lists_every_problem(env: Env) -> None:
    code = new_code()
    broken = template_text(code).replace("kind: compare", "kind: comparison", 1).replace(
        "severity: error", "severity: fatal", 1).replace("type: decimal", "type: money", 1)
    response = post_file(env, "/api/v1/templates/check", broken)

    assert response.status_code == 200, response.text
    result = response.json()
    assert result["ok"] is False
    assert result["template"] is None
    details = [item["detail"] for item in result["problems"]]
    assert len(details) == 3, details
    assert any("'comparison'" in text and "kind" in text for text in details), details
    assert any("'fatal'" in text and "错误 或 提示" in text for text in details), details
    assert any("'money'" in text for text in details), details
    assert f"{code}.v1.yaml" not in added_files(env)


def test_check_accepts_valid_file(env: Env) -> None:
    code = new_code()
    response = post_file(env, "/api/v1/templates/check", template_text(code))

    assert response.status_code == 200, response.text
    assert response.json()["ok"] is True
    assert response.json()["template"]["code"] == code
    assert f"{code}.v1.yaml" not in added_files(env)


@pytest.mark.parametrize(("change", "code", "needle"), [
    (lambda text: text.replace("fields:", "fields: [", 1), "TEMPLATE_YAML_INVALID", "YAML 语法有误"),
    (lambda text: text.replace("kind: compare", "kind: comparison", 1), "TEMPLATE_INVALID", "comparison"),
    (lambda text: text.replace("code_list: 企业规模", "code_list: 无此代码表", 1), "TEMPLATE_CODE_LIST_UNKNOWN", "无此代码表"),
    (lambda text: text.encode("utf-16"), "TEMPLATE_YAML_INVALID", "UTF-8"),
])
def test_bad_upload_stores_nothing(env: Env, change: Any, code: str, needle: str) -> None:
    template_code = new_code()
    before = added_files(env)
    response = post_file(env, "/api/v1/templates", change(template_text(template_code)), name="坏模板.yaml")

    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert needle in response.json()["detail"]
    assert "坏模板.yaml" in response.json()["detail"]
    assert added_files(env) == before
    assert events(env, "templates.upload", "template_file:坏模板.yaml")[-1][0] == "failed"


def test_duplicate_version_rejected(env: Env) -> None:
    code = new_code()
    uploaded(env, code)
    again = post_file(env, "/api/v1/templates", template_text(code))
    shipped = post_file(env, "/api/v1/templates", SOURCE)

    assert again.status_code == 409, again.text
    assert again.json()["code"] == "TEMPLATE_VERSION_EXISTS"
    assert "version 改为 2" in again.json()["detail"]
    assert shipped.status_code == 409, shipped.text
    assert shipped.json()["code"] == "TEMPLATE_VERSION_EXISTS"
    assert "随系统发布的版本不能替换" in shipped.json()["detail"]
    assert uploaded(env, code, 2)["version"] == 2


def test_version_breaking_reference_rejected(env: Env) -> None:
    # EAST_XDHTB looks up EAST_DGKHXXB.KHTYBH in every version, so a version without it is rejected.
    lines = [line for line in SOURCE.replace("version: 1", "version: 7", 1).splitlines() if "{code: KHTYBH," not in line]
    text = "\n".join(lines).replace("KHTYBH", "KHMC")
    response = post_file(env, "/api/v1/templates", text)

    assert response.status_code == 422, response.text
    assert response.json()["code"] == "TEMPLATE_BREAKS_REFERENCE"
    assert "EAST_XDHTB" in response.json()["detail"]


def test_in_use_by_task_immutable(env: Env) -> None:
    code = new_code()
    uploaded(env, code)
    task = env.client.post("/api/v1/tasks", headers=env.auth("reviewer"), json={
        "template_code": code, "template_version": 1, "period_end": "20240131",
        "deadline": "2099-01-31T00:00:00+08:00", "institution_codes": ["bank_a"]})
    assert task.status_code == 201, task.text

    deleted = env.client.delete(f"/api/v1/templates/{code}/versions/1", headers=env.auth("sysadmin"))
    replaced = post_file(env, "/api/v1/templates", template_text(code))
    listing = env.client.get("/api/v1/templates", params={"q": code}, headers=env.auth("sysadmin")).json()

    assert deleted.status_code == 409, deleted.text
    assert deleted.json()["code"] == "TEMPLATE_IN_USE"
    assert "1 个报送任务" in deleted.json()["detail"]
    assert "已使用的版本须保留" in deleted.json()["detail"]
    assert replaced.status_code == 409, replaced.text
    assert replaced.json()["code"] == "TEMPLATE_IN_USE"
    assert "不能替换" in replaced.json()["detail"]
    assert f"{code}.v1.yaml" in added_files(env)
    version = listing["templates"][0]["versions"][0]
    assert (version["in_use"], version["task_count"], version["deletable"]) == (True, 1, False)
    assert events(env, "templates.delete", f"template:{code}.v1")[-1][0] == "failed"


def test_in_use_by_submission_immutable(env: Env) -> None:
    code = new_code()
    uploaded(env, code)
    period = "20240229"
    submitted = upload(env, "reporter_a", code, period, text_file(code, [customer_row(1, period)]))
    assert submitted.status_code == 201, submitted.text
    assert submitted.json()["template_version"] == 1

    deleted = env.client.delete(f"/api/v1/templates/{code}/versions/1", headers=env.auth("sysadmin"))

    assert deleted.status_code == 409, deleted.text
    assert deleted.json()["code"] == "TEMPLATE_IN_USE"
    assert "1 条报送记录" in deleted.json()["detail"]
    assert f"{code}.v1.yaml" in added_files(env)


def test_shipped_version_not_deletable(env: Env) -> None:
    response = env.client.delete("/api/v1/templates/G01/versions/1", headers=env.auth("sysadmin"))

    assert response.status_code == 409, response.text
    assert response.json()["code"] == "TEMPLATE_SHIPPED"
    assert (TEMPLATES_DIR / "G01.v1.yaml").exists()


@pytest.mark.parametrize(("user", "status", "code"), [
    ("reviewer", 403, "FORBIDDEN"),
    ("reporter_a", 403, "FORBIDDEN"),
    ("instadmin_a", 403, "FORBIDDEN"),
    ("", 401, "NOT_AUTHENTICATED"),
])
def test_upload_denied(env: Env, user: str, status: int, code: str) -> None:
    template_code = new_code()
    before = added_files(env)
    upload_response = post_file(env, "/api/v1/templates", template_text(template_code), user=user)
    check_response = post_file(env, "/api/v1/templates/check", template_text(template_code), user=user)
    delete_response = env.client.delete("/api/v1/templates/EAST_DGKHXXB/versions/1",
                                        headers=env.auth(user) if user else {})

    for response in (upload_response, check_response, delete_response):
        assert response.status_code == status, response.text
        assert response.json()["code"] == code
    assert added_files(env) == before


@pytest.mark.parametrize("user", ["modeller_a", "secadmin", "auditor", ""])
def test_read_denied(env: Env, user: str) -> None:
    response = env.client.get("/api/v1/templates", headers=env.auth(user) if user else {})

    assert response.status_code == (403 if user else 401), response.text


def test_failed_write_leaves_nothing(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    code = new_code()
    before = added_files(env)

    def fail_replace(source: Any, target: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("regsandbox_core.files.os.replace", fail_replace)
    response = post_file(env, "/api/v1/templates", template_text(code))
    monkeypatch.undo()

    assert response.status_code == 500, response.text
    assert response.json()["code"] == "TEMPLATE_WRITE_FAILED"
    assert "未做任何修改" in response.json()["detail"]
    assert added_files(env) == before  # neither the file nor a temporary file
    assert code not in template_store.current_catalog()
    assert events(env, "templates.upload", f"template:{code}.v1") == []


def test_broken_file_skipped_and_listed(env: Env) -> None:
    folder = env.settings.data_dir / "templates"
    broken = folder / "ZT_BROKEN.v1.yaml"
    broken.write_text(template_text("ZT_BROKEN").replace("kind: compare", "kind: comparison", 1), encoding="utf-8")
    try:
        state = configure_templates(env.settings)  # what the service does at start
        admin = env.client.get("/api/v1/templates", headers=env.auth("sysadmin")).json()
        reporter = env.client.get("/api/v1/templates", headers=env.auth("reporter_a")).json()
    finally:
        broken.unlink()
        template_store.reload_catalog()

    assert "EAST_DGKHXXB" in state.catalog
    assert "ZT_BROKEN" not in state.catalog
    assert [item["file"] for item in admin["broken_files"]] == ["ZT_BROKEN.v1.yaml"]
    assert "comparison" in admin["broken_files"][0]["detail"]
    assert "其他模板不受影响" in admin["broken_files"][0]["detail"]
    assert reporter["broken_files"] == []


def test_shipped_problem_stops_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from regsandbox_core.errors import ConfigurationError
    from regsandbox_core.settings import Settings

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    for path in TEMPLATES_DIR.glob("*.yaml"):
        (shipped / path.name).write_bytes(path.read_bytes())
    (shipped / "G01.v1.yaml").write_text("code: [", encoding="utf-8")
    monkeypatch.setattr(template_store, "TEMPLATES_DIR", shipped)
    previous = template_store.configured_folder()
    try:
        with pytest.raises(ConfigurationError) as raised:
            configure_templates(Settings(data_dir=tmp_path / "data"))
    finally:
        monkeypatch.undo()
        template_store.configure(previous)

    assert "G01.v1.yaml" in raised.value.message
    assert raised.value.code == "TEMPLATE_YAML_INVALID"
    assert os.path.isdir(tmp_path / "data" / "templates")
