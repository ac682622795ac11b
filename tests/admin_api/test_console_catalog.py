"""Console pages of the data catalog: browser, review queue, column lineage, the steward's forms.

The last test drives the review queue in headless Chromium against admin_api served by uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import pytest

from .conftest import Env
from .helpers import console_cookie
from .test_console_keys import CHROMIUM, CHROMIUM_ARGS, _signed_in, served_admin_api  # noqa: F401 - fixture


def test_catalog_page_search(env: Env) -> None:
    response = env.client.get("/console/catalog", params={"q": "证件号码", "table_code": "EAST_DGKHXXB"},
                              headers=console_cookie(env, "analyst"))

    assert response.status_code == 200
    assert "数据目录" in response.text
    assert "column-EAST_DGKHXXB-FDDBRZJHM" in response.text
    assert "column-EAST_DGKHXXB-KHMC" not in response.text
    assert 'id="nav-catalog"' in response.text


def test_catalog_page_bad_level_message(env: Env) -> None:
    response = env.client.get("/console/catalog", params={"level": "x"}, headers=console_cookie(env, "steward"))

    assert response.status_code == 422
    assert "安全级别“x”无效" in response.text


def test_review_page_steward_forms(env: Env) -> None:
    steward = env.client.get("/console/catalog/review", params={"table_code": "EAST_DKWJXTBDB"},
                             headers=console_cookie(env, "steward"))
    reviewer = env.client.get("/console/catalog/review", params={"table_code": "EAST_DKWJXTBDB"},
                              headers=console_cookie(env, "reviewer"))

    assert steward.status_code == 200
    assert "classify-EAST_DKWJXTBDB-JJYE" in steward.text
    assert 'id="catalog-sync"' in steward.text
    assert "字段代码与中文名称" in steward.text
    assert reviewer.status_code == 200
    assert "review-EAST_DKWJXTBDB-JJYE" in reviewer.text
    assert "classify-EAST_DKWJXTBDB-JJYE" not in reviewer.text


@pytest.mark.parametrize("username", ["sysadmin", "reporter_a", "auditor"])
def test_catalog_pages_forbidden(env: Env, username: str) -> None:
    for path in ("/console/catalog", "/console/catalog/review", "/console/catalog/columns/EAST_XDHTB/KHMC"):
        response = env.client.get(path, headers=console_cookie(env, username))
        assert response.status_code == 403, path
    home = env.client.get("/console/", headers=console_cookie(env, username))
    assert 'id="nav-catalog"' not in home.text


def test_home_lists_catalog_pages(env: Env) -> None:
    steward = env.client.get("/console/", headers=console_cookie(env, "steward"))
    analyst = env.client.get("/console/", headers=console_cookie(env, "analyst"))

    assert 'href="/console/catalog/review"' in steward.text
    assert "分级分类审核" in steward.text
    assert 'href="/console/catalog"' in analyst.text
    assert "分级分类、变更历史和数据血缘（只读）" in analyst.text


def test_catalog_anonymous_to_login(env: Env) -> None:
    response = env.client.get("/console/catalog", follow_redirects=False)

    assert response.status_code == 303
    assert response.headers["location"] == "/console/login"


def test_column_page_lineage_and_history(env: Env) -> None:
    response = env.client.get("/console/catalog/columns/EAST_XDHTB/HTJE", headers=console_cookie(env, "reviewer"))

    assert response.status_code == 200
    assert "数据血缘" in response.text
    assert "intake/EAST_XDHTB" in response.text
    assert "机构数据提取：尚未生成" in response.text
    assert "变更历史" in response.text
    assert "未确认，按 4 级处理" in response.text


def test_classify_form_confirm_then_change(env: Env) -> None:
    browser, csrf = _signed_in(env, "steward")
    path = "/console/catalog/columns/EAST_STZFXXB/JYDSMC"
    page = browser.get(path)
    version = page.text.split('name="version" value="')[1].split('"')[0]

    confirmed = browser.post(f"{path}/classify", data={"csrf_token": csrf, "level": "3", "pi_category": "C2",
                                                        "kind": "person_name", "version": version},
                             follow_redirects=False)
    missing_reason = browser.post(f"{path}/classify", data={"csrf_token": csrf, "level": "2", "pi_category": "",
                                                             "kind": "org_name"})
    changed = browser.post(f"{path}/classify", data={"csrf_token": csrf, "level": "2", "pi_category": "",
                                                      "kind": "org_name", "reason": "受托支付对手均为企业"})

    assert confirmed.status_code == 303
    assert missing_reason.status_code == 422
    assert "须填写变更原因" in missing_reason.text
    assert changed.status_code == 200
    assert "已保存字段 EAST_STZFXXB.JYDSMC 的分级分类" in changed.text
    assert "受托支付对手均为企业" in changed.text


def test_review_queue_error_names_column(env: Env) -> None:
    browser, csrf = _signed_in(env, "steward")

    rejected = browser.post("/console/catalog/columns/EAST_STZFXXB/ZFYT/classify",
                            data={"csrf_token": csrf, "level": "2", "pi_category": "C2", "kind": "other", "back": "review"})

    assert rejected.status_code == 422
    assert "字段 EAST_STZFXXB.ZFYT 未保存：" in rejected.text


def test_classify_form_csrf_rejected(env: Env) -> None:
    response = env.client.post("/console/catalog/columns/EAST_STZFXXB/ZFYT/classify",
                               data={"csrf_token": "forged", "level": "3", "pi_category": "C1", "kind": "free_text"},
                               headers=console_cookie(env, "steward"))

    assert response.status_code == 403
    assert "表单已过期" in response.text


def test_classify_form_denied_for_reviewer(env: Env) -> None:
    browser, csrf = _signed_in(env, "reviewer")

    response = browser.post("/console/catalog/columns/EAST_STZFXXB/ZFYT/classify",
                            data={"csrf_token": csrf, "level": "3", "pi_category": "C1", "kind": "free_text"})

    assert response.status_code == 403


def test_review_queue_in_chromium(env: Env, served_admin_api: str) -> None:  # noqa: F811 - fixture
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{served_admin_api}/console/login")
            page.fill("input[name=username]", "steward")
            page.fill("input[name=password]", env.passwords["steward"])
            page.click("button[type=submit]")
            page.click("header a:has-text('数据目录')")
            page.wait_for_load_state()
            page.click("a:has-text('分级分类审核')")
            page.wait_for_load_state()

            page.select_option("select[name=table_code]", "EAST_DBHTB")
            page.click("button:has-text('筛选')")
            page.wait_for_load_state()
            row = page.locator("#review-EAST_DBHTB-DZYWPGJZ")
            assert "金额" in row.inner_text()
            row.locator("summary").click()
            form = row.locator("form.classify")
            form.locator("select[name=level]").select_option("3")
            form.locator("select[name=pi_category]").select_option("C1")
            form.locator("button[type=submit]").click()
            page.wait_for_load_state()

            assert "已保存字段 EAST_DBHTB.DZYWPGJZ 的分级分类" in page.locator("p.notice").inner_text()
            assert page.locator("#review-EAST_DBHTB-DZYWPGJZ").count() == 0
            page.goto(f"{served_admin_api}/console/catalog/columns/EAST_DBHTB/DZYWPGJZ")
            assert "steward" in page.locator("table.history").inner_text()
        finally:
            browser.close()
