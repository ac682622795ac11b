"""The console page 报表模板: which roles may open it, search, the version page, check, upload and delete, and a browser walk-through.

The environment is the one of test_report_templates.py (one per database backend), because an
uploaded version joins the process-wide catalog. The walk-through serves that environment's
database and data directory with uvicorn on 127.0.0.1 and drives it with Debian Chromium.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from intake.template_model import TEMPLATES_DIR

from .conftest import BACKENDS, Env
from .helpers import console_cookie, serve_admin_api
from .test_console_keys import CHROMIUM, CHROMIUM_ARGS
from .test_report_templates import added_files, events, new_code, private_env, template_text

_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


@pytest.fixture(scope="module", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from private_env(request.param, tmp_path_factory, "console-templates")


def _csrf(env: Env, cookie: dict[str, str]) -> str:
    return _CSRF.search(env.client.get("/console/templates", headers=cookie).text).group(1)  # type: ignore[union-attr]


def _post_file(env: Env, path: str, cookie: dict[str, str], content: str, csrf: str | None = None) -> httpx.Response:
    token = _csrf(env, cookie) if csrf is None else csrf
    return env.client.post(path, headers=cookie, data={"csrf_token": token}, follow_redirects=False,
                           files={"file": ("模板.yaml", content.encode("utf-8"), "application/yaml")})


def test_page_and_nav_by_role(env: Env) -> None:
    for username, status in (("sysadmin", 200), ("reviewer", 200), ("analyst", 200), ("reporter_a", 200),
                             ("instadmin_a", 200), ("modeller_a", 403), ("secadmin", 403), ("auditor", 403)):
        cookie = console_cookie(env, username)
        page = env.client.get("/console/templates", headers=cookie)
        home = env.client.get("/console/", headers=cookie)

        assert page.status_code == status, username
        assert ('href="/console/templates"' in home.text) is (status == 200), username
        assert ('id="template-upload"' in page.text) is (username == "sysadmin"), username


def test_anonymous_sent_to_login(env: Env) -> None:
    response = env.client.get("/console/templates", follow_redirects=False)

    assert response.status_code == 303
    assert response.headers["location"] == "/console/login"


def test_search_and_version_page(env: Env) -> None:
    cookie = console_cookie(env, "reporter_a")
    found = env.client.get("/console/templates", params={"q": "信贷合同"}, headers=cookie)
    none = env.client.get("/console/templates", params={"q": "不存在的报表"}, headers=cookie)
    version = env.client.get("/console/templates/EAST_DGKHXXB/1", headers=cookie)

    assert 'id="template-EAST_XDHTB-v1"' in found.text
    assert 'id="template-EAST_DGKHXXB-v1"' not in found.text
    assert "没有代码或名称含“不存在的报表”的模板" in none.text
    assert version.status_code == 200
    for heading in ("<th>代码</th>", "<th>名称</th>", "<th>类型</th>", "<th>长度</th>", "<th>精度</th>", "<th>必填</th>",
                    "<th>级别</th>"):
        assert heading in version.text, heading
    rules = version.text.split('id="template-rules"')[1]
    assert ">错误</td>" in rules
    assert ">提示</td>" in rules
    assert "随系统发布" in version.text
    assert 'id="template-delete"' not in version.text
    assert 'href="/console/templates/EAST_DGKHXXB/1/yaml"' in version.text


def test_download_from_console(env: Env) -> None:
    response = env.client.get("/console/templates/G01/1/yaml", headers=console_cookie(env, "analyst"))

    assert response.status_code == 200
    assert response.content == (TEMPLATES_DIR / "G01.v1.yaml").read_bytes()
    assert events(env, "templates.download", "template:G01.v1")[-1][0] == "success"


def test_check_shows_every_problem(env: Env) -> None:
    cookie = console_cookie(env, "sysadmin")
    code = new_code()
    bad = template_text(code).replace("kind: compare", "kind: comparison", 1).replace("severity: error", "severity: 致命", 1)
    response = _post_file(env, "/console/templates/check", cookie, bad)

    assert response.status_code == 422
    problems = response.text.split('id="check-problems"')[1].split("</ol>")[0]
    assert problems.count("<li>") == 2
    assert "comparison" in problems
    assert "致命" in problems
    assert f"{code}.v1.yaml" not in added_files(env)


def test_upload_then_delete(env: Env) -> None:
    cookie = console_cookie(env, "sysadmin")
    code = new_code()
    checked = _post_file(env, "/console/templates/check", cookie, template_text(code))
    assert checked.status_code == 200
    assert f"预检通过：文件 模板.yaml 为模板 {code}" in checked.text

    created = _post_file(env, "/console/templates", cookie, template_text(code))
    assert created.status_code == 303, created.text
    assert created.headers["location"] == f"/console/templates/{code}/1?uploaded=1"
    page = env.client.get(created.headers["location"], headers=cookie)
    assert "已上传新版本" in page.text
    assert "管理员添加" in page.text
    assert 'id="template-delete"' in page.text

    deleted = env.client.post(f"/console/templates/{code}/1/delete", headers=cookie,
                              data={"csrf_token": _csrf(env, cookie)}, follow_redirects=False)
    assert deleted.status_code == 303
    listing = env.client.get(deleted.headers["location"], headers=cookie)
    assert f"已删除报表模板 {code} 第 1 版。" in listing.text
    assert f"{code}.v1.yaml" not in added_files(env)


def test_upload_problem_shown_not_stored(env: Env) -> None:
    cookie = console_cookie(env, "sysadmin")
    response = _post_file(env, "/console/templates", cookie, "code: [")

    assert response.status_code == 422
    assert "未上传：文件 模板.yaml 有 1 处问题" in response.text
    assert "YAML 语法有误" in response.text
    assert events(env, "templates.upload", "template_file:模板.yaml")[-1][0] == "failed"


def test_in_use_delete_rejected(env: Env) -> None:
    cookie = console_cookie(env, "sysadmin")
    code = new_code()
    assert _post_file(env, "/console/templates", cookie, template_text(code)).status_code == 303
    task = env.client.post("/api/v1/tasks", headers=env.auth("reviewer"), json={
        "template_code": code, "period_end": "20240331", "deadline": "2099-01-31T00:00:00+08:00",
        "institution_codes": ["bank_b"]})
    assert task.status_code == 201, task.text

    page = env.client.get(f"/console/templates/{code}/1", headers=cookie)
    rejected = env.client.post(f"/console/templates/{code}/1/delete", headers=cookie,
                              data={"csrf_token": _csrf(env, cookie)}, follow_redirects=False)

    assert 'id="template-delete"' not in page.text
    assert "使用中（1 个报送任务" in page.text
    assert rejected.status_code == 409
    assert "已被 1 个报送任务使用，不能删除" in rejected.text
    assert "已使用的版本须保留" in rejected.text
    assert f"{code}.v1.yaml" in added_files(env)


@pytest.mark.parametrize("username", ["reviewer", "reporter_a", "instadmin_a"])
def test_non_admin_upload_denied(env: Env, username: str) -> None:
    admin_cookie = console_cookie(env, "sysadmin")
    cookie = console_cookie(env, username)
    token = _CSRF.search(env.client.get("/console/", headers=cookie).text).group(1)  # type: ignore[union-attr]
    code = new_code()
    response = _post_file(env, "/console/templates", cookie, template_text(code), csrf=token)
    delete = env.client.post("/console/templates/EAST_DGKHXXB/1/delete", headers=cookie, data={"csrf_token": token})

    assert response.status_code == 403
    assert delete.status_code == 403
    assert f"{code}.v1.yaml" not in added_files(env)
    assert _csrf(env, admin_cookie)


def test_bad_csrf_denied(env: Env) -> None:
    cookie = console_cookie(env, "sysadmin")
    code = new_code()
    response = _post_file(env, "/console/templates", cookie, template_text(code), csrf="forged")

    assert response.status_code == 403
    assert "表单已过期" in response.text
    assert f"{code}.v1.yaml" not in added_files(env)


# --- browser walk-through --------------------------------------------------------------------------------


@pytest.fixture
def served(env: Env, tmp_path: Path) -> Iterator[str]:
    """Serve the env with uvicorn on 127.0.0.1 (demo users sign in without TOTP, as in the env fixture)."""
    with serve_admin_api(env, tmp_path / "uvicorn.log", REGSANDBOX_TOTP_REQUIRED_ROLES="[]") as url:
        yield url


def test_browser_walkthrough(env: Env, served: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    code = new_code()
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(template_text(code).replace("kind: compare", "kind: comparison", 1), encoding="utf-8")
    good_file = tmp_path / f"{code}.yaml"
    good_file.write_text(template_text(code), encoding="utf-8")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{served}/console/login")
            page.fill("input[name=username]", "sysadmin")
            page.fill("input[name=password]", env.passwords["sysadmin"])
            page.click("form.login button[type=submit]")
            page.wait_for_load_state()
            page.click("header a:has-text('报表模板')")
            page.wait_for_load_state()

            page.fill("#template-search input[name=q]", "EAST_DGKHXXB")
            page.click("#template-search button[type=submit]")
            page.wait_for_load_state()
            assert page.locator("#template-list tbody tr").count() == 1

            page.set_input_files("#template-upload input[name=file]", str(bad_file))
            page.click("#template-check")
            page.wait_for_load_state()
            assert "comparison" in page.locator("#check-problems").inner_text()

            page.set_input_files("#template-upload input[name=file]", str(good_file))
            page.click("#template-check")
            page.wait_for_load_state()
            assert "预检通过" in page.locator("#check-result").inner_text()
            page.set_input_files("#template-upload input[name=file]", str(good_file))
            page.click("#template-submit")
            page.wait_for_load_state()
            assert "已上传新版本" in page.locator("p.notice").inner_text()
            assert page.locator("#template-rules td:has-text('提示')").count() >= 1

            page.once("dialog", lambda dialog: dialog.accept())
            page.click("#template-delete button")
            page.wait_for_load_state()
            assert f"已删除报表模板 {code} 第 1 版" in page.locator("p.notice").inner_text()
        finally:
            browser.close()
    assert f"{code}.v1.yaml" not in added_files(env)
