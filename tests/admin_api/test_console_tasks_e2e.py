"""The 报送任务 walk-through in headless Chromium against a real uvicorn on 127.0.0.1.

The reviewer opens the workbench from the first navigation item, publishes a task for bank_a
and bank_b through the form and finds both targets 未报送. The reporter of bank_a finds the task
on the workbench with the days left, opens it and finds only bank_a's row with the upload link.
The analyst opens 报送统计 and sorts it by 审核通过率. Second factors are switched off, as in the
other test environments, so the walk-through needs no TOTP enrolment.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from admin_api.db import utc_now
from admin_api.display import BEIJING

from .conftest import BACKENDS, Env, backend_env
from .helpers import serve_admin_api
from .test_console_e2e import sign_in
from .test_console_keys import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="module", params=BACKENDS)
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    yield from backend_env(request.param, tmp_path_factory, "task-e2e")


@pytest.fixture
def served(env: Env, tmp_path: Path) -> Iterator[str]:
    with serve_admin_api(env, tmp_path / "uvicorn.log", REGSANDBOX_TOTP_REQUIRED_ROLES="[]") as url:
        yield url


def test_task_walkthrough(env: Env, served: str) -> None:
    from playwright.sync_api import sync_playwright

    url = served
    deadline = (utc_now() + timedelta(days=4, hours=2)).astimezone(BEIJING).strftime("%Y-%m-%dT%H:%M")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            sign_in(page, url, "reviewer", env.passwords["reviewer"], None)
            first_link = page.locator("header a").first
            assert first_link.inner_text() == "工作台"
            first_link.click()
            page.wait_for_load_state()
            assert page.locator("#review-queue").count() == 1
            assert page.locator("#worst-institutions").count() == 1

            page.click("header a#nav-tasks")
            page.wait_for_load_state()
            form = page.locator("#create-task")
            form.locator("select[name=template]").select_option("EAST_DGKHXXB:1")
            form.locator("input[name=period_end]").fill("20211130")
            form.locator("input[name=deadline]").fill(deadline)
            form.locator("textarea[name=institution_codes]").fill("bank_a, bank_b")
            form.locator("button[type=submit]").click()
            page.wait_for_load_state()
            assert "已发布报送任务" in page.locator("p.notice").inner_text()
            task_path = page.url.split(url, 1)[1].split("?", 1)[0]
            assert page.locator("#targets tbody tr").count() == 2
            assert "未报送" in page.locator("#target-bank_b").inner_text()
            page.click("header button:has-text('退出登录')")
            page.wait_for_load_state()

            sign_in(page, url, "reporter_a", env.passwords["reporter_a"], None)
            page.click("header a#nav-workbench")
            page.wait_for_load_state()
            due = page.locator("#due-tasks tbody tr", has_text="20211130")
            assert due.count() == 1
            assert "剩余 4 天" in due.inner_text()
            due.locator("a", has_text=task_path.rsplit("/", 1)[1]).first.click()
            page.wait_for_load_state()
            assert page.locator("#targets tbody tr").count() == 1
            assert page.locator("#target-bank_b").count() == 0
            task_id = task_path.rsplit("/", 1)[1]
            assert page.locator(f"#target-bank_a a[href='/console/submissions/new?task={task_id}']").count() == 1
            denied = page.goto(f"{url}/console/tasks/statistics")
            assert denied is not None and denied.status == 403
            assert "查看报送统计" in page.content()
            page.goto(f"{url}/console/workbench")
            page.click("header button:has-text('退出登录')")
            page.wait_for_load_state()

            sign_in(page, url, "analyst", env.passwords["analyst"], None)
            page.goto(f"{url}/console/tasks")
            page.click("#statistics-link")
            page.wait_for_load_state()
            page.locator("#institution-rates thead a.sort-acceptance_rate").click()
            page.wait_for_load_state()
            assert "sort=acceptance_rate" in page.url
            assert "审核通过率 ↑" in page.locator("#institution-rates thead").inner_text()
        finally:
            browser.close()
