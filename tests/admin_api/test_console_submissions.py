"""The console pages 报表报送 and 报表审核: forms, denied cases, and bad files uploaded in headless Chromium.

The bad-file cases upload through the console what tests/intake and test_submissions.py check at the
reader and API level, and check what a person reads: the Chinese message on the page, and that a
rejected file leaves no submission and no file behind. Periods are in 2021, apart from the other
submission tests of the shared environment.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from admin_api.models import AuditEvent, ReportSubmission

from .conftest import Env
from .helpers import console_cookie
from .test_console_keys import CHROMIUM, CHROMIUM_ARGS, served_admin_api  # noqa: F401  # fixture
from .test_submission_workflow import EARLY_RELATION, WARNING_RULE, customer
from .test_submissions import (  # noqa: F401  # bank_a_licence: bank_a gets the test files' 金融许可证号
    actions,
    bank_a_licence,
    intake_files,
    messages_of,
    submission_count,
    text_file,
)

CUSTOMERS = "EAST_DGKHXXB"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def signed_in(env: Env, username: str) -> TestClient:
    """A client with its own cookie jar, signed in to the console as ``username``."""
    browser = TestClient(env.client.app)
    form = browser.get("/console/login")
    response = browser.post("/console/login", follow_redirects=False, data={
        "username": username, "password": env.passwords[username], "csrf_token": _csrf(form.text)})
    assert response.status_code == 303, response.text
    return browser


def _csrf(html: str) -> str:
    match = _CSRF.search(html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def console_upload(browser: TestClient, period: str, content: bytes, mode: str = "submit",
                   template_code: str = CUSTOMERS) -> Any:
    page = browser.get("/console/submissions")
    return browser.post("/console/submissions", follow_redirects=False, data={
        "template_code": template_code, "period_end": period, "mode": mode, "csrf_token": _csrf(page.text)},
        files={"file": ("客户表.txt", content, "text/plain")})


def submission_id(response: Any) -> int:
    assert response.status_code == 303, response.text
    return int(re.search(r"/console/submissions/([0-9]+)\?", response.headers["location"]).group(1))


def form_post(browser: TestClient, submission: int, action: str, data: dict[str, Any] | None = None) -> Any:
    page = browser.get(f"/console/submissions/{submission}")
    assert page.status_code == 200, page.text
    return browser.post(f"/console/submissions/{submission}/{action}", follow_redirects=False,
                        data={**(data or {}), "csrf_token": _csrf(page.text)})


def state_of(env: Env, submission: int) -> str:
    with env.db() as session:
        return session.get(ReportSubmission, submission).state


# --- forms -----------------------------------------------------------------------------------------


def test_nav_by_capability(env: Env) -> None:
    expected = {"reporter_a": ("报表报送", None), "reviewer": ("报送记录", "报表审核"), "analyst": ("报送记录", None),
                "sysadmin": (None, None)}
    for username, (submit_link, review_link) in expected.items():
        header = signed_in(env, username).get("/console/").text.split("</header>")[0]
        for link in ("报表报送", "报送记录", "报表审核"):
            assert (link in header) == (link in (submit_link, review_link)), (username, link)


def test_draft_then_submit_in_console(env: Env) -> None:
    period = "20210131"
    reporter = signed_in(env, "reporter_a")
    rows = [customer(1, period, JLKHGXRQ=EARLY_RELATION), customer(2, period)]

    draft = submission_id(console_upload(reporter, period, text_file(CUSTOMERS, rows), mode="draft"))

    page = reporter.get(f"/console/submissions/{draft}?done=draft")
    assert "已保存为草稿" in page.text
    assert "草稿" in page.text.split('id="state"')[1][:200]
    assert WARNING_RULE in page.text
    assert "建立客户关系日期应不早于成立日期" in page.text
    assert 'id="submit-draft"' in page.text
    listing = reporter.get("/console/submissions?state=draft").text
    assert f'id="submission-{draft}"' in listing
    assert f'id="submission-{draft}"' not in signed_in(env, "reviewer").get("/console/submissions").text
    assert signed_in(env, "reviewer").get(f"/console/submissions/{draft}").status_code == 404

    submitted = form_post(reporter, draft, "submit")

    assert submitted.status_code == 303, submitted.text
    assert state_of(env, draft) == "pending_review"
    assert ("submissions.submit_draft", "success", "reporter_a") in actions(env, f"submission:{draft}")
    queue = signed_in(env, "reviewer").get("/console/reviews").text
    assert f'id="submission-{draft}"' in queue
    csv_file = reporter.get(f"/console/submissions/{draft}/errors.csv")
    assert csv_file.status_code == 200
    assert csv_file.content.decode("utf-8-sig").splitlines()[0].endswith("审核豁免")


def test_review_forms(env: Env) -> None:
    period = "20210228"
    reporter, reviewer = signed_in(env, "reporter_a"), signed_in(env, "reviewer")
    rows = [customer(1, period, JLKHGXRQ=EARLY_RELATION), customer(2, period, JLKHGXRQ=EARLY_RELATION)]
    first = submission_id(console_upload(reporter, period, text_file(CUSTOMERS, rows)))

    raw = reviewer.get(f"/console/submissions/{first}/raw")
    assert raw.content == text_file(CUSTOMERS, rows)
    assert ("submissions.raw_read", "success", "reviewer") in actions(env, f"submission:{first}")
    assert reporter.get(f"/console/submissions/{first}/raw").status_code == 403
    refused = form_post(reviewer, first, "accept", {"comment": "同意"})
    assert refused.status_code == 409
    assert "尚有 2 条提示既未在备注中说明也未豁免" in refused.text
    bad_lines = form_post(reviewer, first, "waive", {"rule_id": WARNING_RULE, "lines": "2, x", "reason": "核实"})
    assert bad_lines.status_code == 422
    assert "行号“x”无效" in bad_lines.text
    waived = form_post(reviewer, first, "waive", {"rule_id": WARNING_RULE, "lines": "2，3", "reason": "已核实营业执照"})
    assert waived.status_code == 303, waived.text
    page = reviewer.get(f"/console/submissions/{first}").text
    assert "已豁免：已核实营业执照" in page
    assert "第 2、3 行" in page
    accepted = form_post(reviewer, first, "accept", {"comment": "同意"})
    assert accepted.status_code == 303, accepted.text
    assert state_of(env, first) == "accepted"

    second = submission_id(console_upload(reporter, period, text_file(CUSTOMERS, [customer(3, period)])))
    no_comment = form_post(reviewer, second, "return", {"comment": " "})
    assert no_comment.status_code == 422
    assert "退回报表须填写退回意见" in no_comment.text
    returned = form_post(reviewer, second, "return", {
        "comment": "客户名称与工商登记不符", "row_line": ["2", ""], "row_field": ["KHMC", ""],
        "row_comment": ["请按营业执照填写", ""]})
    assert returned.status_code == 303, returned.text
    assert state_of(env, second) == "returned"
    assert messages_of(env, "reporter_a")[-1].link == f"/console/submissions/{second}"
    page = reporter.get(f"/console/submissions/{second}").text
    assert "请按营业执照填写" in page
    assert "客户名称与工商登记不符" in page
    assert 'id="resubmit"' in page


def test_console_denied(env: Env) -> None:
    period = "20210331"
    reporter = signed_in(env, "reporter_a")
    draft = submission_id(console_upload(reporter, period, text_file(CUSTOMERS, [customer(1, period)]), mode="draft"))
    pending = submission_id(console_upload(reporter, "20210430", text_file(CUSTOMERS, [customer(1, "20210430")])))
    other, reviewer = signed_in(env, "reporter_b"), signed_in(env, "reviewer")
    csrf_other = _csrf(other.get("/console/submissions").text)
    csrf_reviewer = _csrf(reviewer.get("/console/reviews").text)
    csrf_reporter = _csrf(reporter.get("/console/submissions").text)

    for path in ("", "/errors.csv", "/errors.xlsx"):
        response = other.get(f"/console/submissions/{draft}{path}")
        assert response.status_code == 403, path
        assert "无权访问机构 bank_a" in response.text
    for action in ("submit", "discard"):
        assert other.post(f"/console/submissions/{draft}/{action}",
                          data={"csrf_token": csrf_other}).status_code == 403, action
        assert reviewer.post(f"/console/submissions/{draft}/{action}",
                             data={"csrf_token": csrf_reviewer}).status_code == 403, action
    for action, data in (("waive", {"rule_id": WARNING_RULE, "reason": "x"}), ("accept", {}),
                         ("return", {"comment": "x"})):
        assert reporter.post(f"/console/submissions/{pending}/{action}",
                             data={**data, "csrf_token": csrf_reporter}).status_code == 403, action
    assert reporter.get("/console/reviews").status_code == 403
    assert reviewer.post("/console/submissions", data={"csrf_token": csrf_reviewer, "template_code": CUSTOMERS,
                                                       "period_end": period}).status_code == 403
    forged = reporter.post(f"/console/submissions/{draft}/submit", data={"csrf_token": "forged"})
    assert forged.status_code == 403
    anonymous = TestClient(env.client.app)
    for path in ("/console/submissions", f"/console/submissions/{pending}", "/console/reviews"):
        response = anonymous.get(path, follow_redirects=False)
        assert (response.status_code, response.headers.get("location")) == (303, "/console/login"), path
    assert anonymous.post(f"/console/submissions/{draft}/submit", follow_redirects=False).status_code == 303
    assert (state_of(env, draft), state_of(env, pending)) == ("draft", "pending_review")


# --- bad files in headless Chromium ----------------------------------------------------------------

OTHER_LICENCE = "B0002H222000002"


def _lines(period: str, count: int = 2, **changes: str) -> list[str]:
    return text_file(CUSTOMERS, [customer(n, period, **changes) for n in range(1, count + 1)]).decode().splitlines()


@dataclass(frozen=True)
class BadFile:
    period: str
    content: Callable[[str], bytes]
    outcome: str
    """``rejected``: an error message and nothing stored; else the state name shown on the detail page."""
    shown: tuple[str, ...]
    """Texts the page must show: the message, or findings and values on the detail page."""
    filename: str = "客户表.txt"
    template_code: str = CUSTOMERS


BAD_FILES = {
    "gbk_chinese": BadFile("20210531", lambda p: "\n".join(_lines(p, QYGM="中型")).encode("gbk") + b"\n",
                           "校验未通过", ("gb18030", "中型", "企业规模")),
    "utf8_bom": BadFile("20210630", lambda p: b"\xef\xbb\xbf" + "\n".join(_lines(p)).encode() + b"\n",
                        "待审核", ("utf-8", "错误 0 条")),
    "full_width_digits": BadFile("20210731", lambda p: "\n".join(_lines(p, ZCZB="５０００００．００")).encode() + b"\n",
                                 "待审核", ("错误 0 条",)),
    "thousands_separators": BadFile("20210831", lambda p: "\n".join(_lines(p, ZCZB="5,000,000.00")).encode() + b"\n",
                                    "校验未通过", ("5,000,000.00", "千位分隔符")),
    "trailing_delimiter": BadFile("20210930", lambda p: "".join(f"{line}|\n" for line in _lines(p)).encode(),
                                  "待审核", ("错误 0 条",)),
    "other_institution": BadFile("20211031", lambda p: "\n".join(_lines(p, JRXKZH=OTHER_LICENCE)).encode() + b"\n",
                                 "校验未通过", (OTHER_LICENCE, "金融许可证号")),
    "empty": BadFile("20211130", lambda p: b"", "rejected", ("文件",)),
    "header_only": BadFile("20211130", lambda p: (_lines(p)[0] + "\n").encode(), "rejected", ("没有数据行",)),
    "binary_as_csv": BadFile("20211130", lambda p: bytes(range(256)) * 4, "rejected",
                             ("客户表.csv", "不是"), filename="客户表.csv"),
    "unknown_template": BadFile("20211130", lambda p: "\n".join(_lines(p)).encode() + b"\n", "rejected",
                                ("EAST_NOPE", "不存在", "EAST_DGKHXXB"), template_code="EAST_NOPE"),
}
EXPECTED_CODES = {"empty": "FILE_EMPTY", "header_only": "FILE_NO_ROWS", "binary_as_csv": "FILE_BINARY",
                  "unknown_template": "TEMPLATE_NOT_FOUND"}


def _browser_upload(page: Any, url: str, case: BadFile) -> None:  # noqa: ANN401 - a Playwright page
    page.goto(f"{url}/console/submissions")
    form = page.locator("#upload-form")
    if case.template_code == CUSTOMERS:
        form.locator("select[name=template_code]").select_option(CUSTOMERS)
    else:  # a stale or edited form: the code is not among the options
        form.locator("select[name=template_code]").evaluate(
            "(select, code) => { select.add(new Option(code, code)); select.value = code; }", case.template_code)
    form.locator("input[name=period_end]").fill(case.period)
    form.locator("input[name=file]").set_input_files(
        {"name": case.filename, "mimeType": "text/plain", "buffer": case.content(case.period)})
    form.locator("input[name=mode][value=submit]").check()
    form.locator("button[type=submit]").click()
    page.wait_for_load_state()


def test_bad_files_in_chromium(env: Env, served_admin_api: str) -> None:  # noqa: F811 - fixture
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"{served_admin_api}/console/login")
            page.fill("input[name=username]", "reporter_a")
            page.fill("input[name=password]", env.passwords["reporter_a"])
            page.click("form.login button[type=submit]")
            page.wait_for_load_state()
            page.click("header a:has-text('报表报送')")
            page.wait_for_load_state()
            assert page.locator("#upload-form").is_visible()

            for kind, case in BAD_FILES.items():
                files_before, rows_before = intake_files(env), submission_count(env)

                _browser_upload(page, served_admin_api, case)

                if case.outcome == "rejected":
                    message = page.locator("p.error").inner_text()
                    assert any("\u4e00" <= char <= "\u9fff" for char in message), (kind, message)
                    for text in case.shown:
                        assert text in message, (kind, message)
                    assert (submission_count(env), intake_files(env)) == (rows_before, files_before), kind
                    assert page.locator("#upload-form input[name=period_end]").input_value() == case.period, kind
                    with env.db() as session:
                        event = session.scalars(select(AuditEvent).where(
                            AuditEvent.action == "submissions.submit", AuditEvent.actor == "reporter_a")
                            .order_by(AuditEvent.id.desc())).first()
                    assert (event.outcome, json.loads(event.detail)["code"]) == ("failed", EXPECTED_CODES[kind]), kind
                    continue
                assert re.search(r"/console/submissions/[0-9]+\?done=uploaded$", page.url), (kind, page.url)
                assert page.locator("#state").inner_text() == case.outcome, kind
                content = page.locator("main").inner_text()
                for text in case.shown:
                    assert text in content, (kind, text)
                if case.outcome == "校验未通过":
                    assert page.locator("#findings tbody tr").count() >= 1, kind
                    assert "校验未通过" in page.locator("p.error").inner_text(), kind
                    assert page.locator("p.notice").count() == 0, kind
                else:
                    assert page.locator("p.notice").inner_text() == "已上传并完成校验。", kind
            page.screenshot(path=str(Path(env.settings.data_dir) / "console-submissions.png"))
        finally:
            browser.close()


@pytest.mark.parametrize(("username", "shown", "hidden"), [
    ("reporter_a", ('href="/console/submissions">报表报送', 'href="/console/templates">报表模板'), ("/console/reviews",)),
    ("reviewer", ('href="/console/reviews">报表审核', 'href="/console/submissions">报送记录'), ("上传报表文件",)),
    ("sysadmin", ("查看、上传和删除报表模板版本",), ("/console/reviews",)),
])
def test_home_lists_intake_pages(env: Env, username: str, shown: tuple[str, ...], hidden: tuple[str, ...]) -> None:
    page = env.client.get("/console/", headers=console_cookie(env, username)).text
    features = page.split("<h3>可用功能</h3>", 1)[1]

    for text in shown:
        assert text in features
    for text in hidden:
        assert text not in features
