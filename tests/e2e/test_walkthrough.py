"""The walk-through of a first user, driven through real clients against `regsandbox up`.

Tests in this module run in order against one platform per database backend. The modeller of
bank_a trains and registers a model in her sandbox, the regulator reviews it, and the scheduler
runs and emails the approved report notebook.
"""

from __future__ import annotations

import email
import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from email import policy
from pathlib import Path

import httpx
import polars as pl
import pytest

from tests.e2e.clients import HubUser
from tests.e2e.conftest import PROJECT_ROOT, UNIX_PREFIX

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def api_headers(platform, username: str) -> dict[str, str]:
    response = httpx.post(f"{platform.admin_api_url}/api/v1/auth/token",
                          json={"username": username, "password": platform.credentials[username]})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def platform_secrets(platform) -> dict[str, str]:
    """Decrypt the platform secrets as a service does, with the master key that `regsandbox up` created."""
    from regsandbox_core.secrets import load_platform_secrets
    from regsandbox_core.settings import Settings

    return vars(load_platform_secrets(Settings(data_dir=platform.data_dir)))


def mlflow_auth(platform, username: str) -> tuple[str, str]:
    from regsandbox_core.secrets import PlatformSecrets, mlflow_password

    return username, mlflow_password(PlatformSecrets(**platform_secrets(platform)), username)


def audit_events(platform) -> list[dict]:
    response = httpx.get(f"{platform.admin_api_url}/api/v1/audit/events",
                         headers=api_headers(platform, "auditor"), params={"limit": 1000})
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(predicate, timeout: float, interval: float = 1.0, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{message} not met within {timeout} s")


def test_up_prints_urls_and_credentials(platform):
    output = platform.output()
    assert f"{platform.admin_api_url}/console/" in output
    assert f"{platform.hub_url}/hub/login" in output
    assert {"modeller_a", "modeller_b", "modeller_c", "reporter_a", "reviewer", "sysadmin", "secadmin",
            "auditor"} <= set(platform.credentials)
    assert all(password in output for password in platform.credentials.values())
    assert stat.S_IMODE((platform.data_dir / "credentials.txt").stat().st_mode) == 0o600


def test_up_again_is_safe(platform):
    again = platform.regsandbox("up")
    assert again.returncode == 0
    assert "已在运行" in again.stdout
    assert platform.process.poll() is None


def raw_warehouse(platform) -> pl.DataFrame:
    """Decrypt the warehouse partitions with the data directory's key store, as the extract builder does."""
    from extracts.warehouse import read_partition
    from regsandbox_core.platform_keys import open_keystore
    from regsandbox_core.settings import Settings

    settings = Settings(data_dir=platform.data_dir)
    store = open_keystore(settings)
    return pl.concat([read_partition(settings, store, code) for code in ("bank_a", "bank_b", "bank_c")])


def test_extracts_hold_no_raw_identifiers(platform):
    assert not list((platform.data_dir / "warehouse").rglob("*.parquet"))
    warehouse = raw_warehouse(platform)
    assert warehouse.height == 1000
    raw_values = set(warehouse["name"]) | set(warehouse["id_number"]) | set(warehouse["mobile"])

    total = 0
    for code in ("bank_a", "bank_b", "bank_c"):
        folder = platform.data_dir / "extracts" / code
        manifest = json.loads((folder / "manifest.json").read_text())
        extract = pl.read_parquet(folder / "applications.parquet")
        total += extract.height
        assert manifest["tables"][0]["row_count"] == extract.height
        assert platform.regsandbox("verify", str(folder / "manifest.json"), check=False).returncode == 0
        strings = {value for column in extract.columns if extract[column].dtype == pl.String
                   for value in extract[column].to_list()}
        assert not strings & raw_values
        treatments = {column["name"]: column["treatment"] for column in manifest["tables"][0]["columns"]}
        assert [treatments[name] for name in ("name", "id_number", "mobile")] == ["partial_mask", "token", "partial_mask"]
        assert stat.S_IMODE(folder.stat().st_mode) == 0o750
        assert folder.stat().st_gid == __import__("grp").getgrnam(f"{UNIX_PREFIX}{code}").gr_gid
    assert total == 1000


def test_modeller_a_works_in_her_sandbox(platform):
    user = HubUser(platform.hub_url, "modeller_a", platform.credentials["modeller_a"])
    assert user.login().status_code == 200
    user.create_token()
    assert user.start_server().status_code < 400

    home = pwd.getpwnam(f"{UNIX_PREFIX}modeller_a").pw_dir
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700

    # The starter notebook is in her JupyterLab file browser, owned by her.
    listing = user.http.get("/user/modeller_a/api/contents/starter", headers=user.auth)
    assert listing.status_code == 200, listing.text
    assert "pd_model_starter.ipynb" in {item["name"] for item in listing.json()["content"]}
    assert Path(home, "starter", "pd_model_starter.ipynb").stat().st_uid == pwd.getpwnam(f"{UNIX_PREFIX}modeller_a").pw_uid
    notebook = user.http.get("/user/modeller_a/api/contents/starter/pd_model_starter.ipynb",
                             headers=user.auth).json()["content"]

    kernelspecs = user.http.get("/user/modeller_a/api/kernelspecs", headers=user.auth).json()
    assert kernelspecs["default"] == "regsandbox"
    assert set(kernelspecs["kernelspecs"]) == {"regsandbox"}
    assert "进入我的沙箱" in user.http.get("/hub/home").text

    kernel = user.start_kernel("regsandbox")
    try:
        whoami = kernel.execute("import os, pwd; print(pwd.getpwuid(os.getuid()).pw_name)")
        assert whoami.stdout.strip() == f"{UNIX_PREFIX}modeller_a"

        listing = kernel.execute(
            "from regsandbox_kernel import tables, sql\n"
            "frame = sql('SELECT count(*) AS n FROM applications')\n"
            "print(tables(), type(frame).__module__.split('.')[0], frame['n'][0])"
        )
        assert listing.error_name is None, listing.error_value
        assert "applications" in listing.stdout
        assert "polars" in listing.stdout

        other = platform.data_dir / "extracts" / "bank_b" / "applications.parquet"
        by_path = kernel.execute(f"open({str(other)!r}, 'rb').read(4)")
        assert by_path.error_name == "PermissionError"
        by_duckdb = kernel.execute(f"sql(\"SELECT count(*) FROM read_parquet('{other}')\")")
        assert by_duckdb.error_name == "SandboxAccessError"

        for cell in notebook["cells"]:
            if cell["cell_type"] == "code":
                outcome = kernel.execute("".join(cell["source"]), timeout=300)
                assert outcome.error_name is None, f"{outcome.error_name}: {outcome.error_value}"
    finally:
        kernel.close()

    from model_registry.client import MlflowAdmin

    admin = MlflowAdmin(platform.mlflow_url, "admin", platform_secrets(platform)["mlflow_admin_password"])
    versions = [v for v in admin.list_model_versions() if v["name"] == "bank_a.pd_logreg"]
    assert versions, "the starter notebook did not register bank_a.pd_logreg"
    assert {"auc", "ks"} <= set(versions[0]["metrics"])


def test_modeller_a_cannot_read_bank_b_in_mlflow(platform):
    as_b = mlflow_auth(platform, "modeller_b")
    created = httpx.post(f"{platform.mlflow_url}/api/2.0/mlflow/registered-models/create",
                         json={"name": "bank_b.pd_b"}, auth=as_b)
    assert created.status_code == 200, created.text

    as_a = mlflow_auth(platform, "modeller_a")
    model = httpx.get(f"{platform.mlflow_url}/api/2.0/mlflow/registered-models/get",
                      params={"name": "bank_b.pd_b"}, auth=as_a)
    assert model.status_code == 403
    experiment = httpx.get(f"{platform.mlflow_url}/api/2.0/mlflow/experiments/get-by-name",
                           params={"experiment_name": "bank_b/sandbox"}, auth=as_a)
    assert experiment.status_code == 403


def test_reviewer_approves_in_the_console(platform):
    from playwright.sync_api import sync_playwright

    headers = api_headers(platform, "reviewer")
    listing = httpx.get(f"{platform.admin_api_url}/api/v1/models", headers=headers)
    assert listing.status_code == 200, listing.text
    ours = [m for m in listing.json() if m["name"] == "bank_a.pd_logreg"]
    assert ours and ours[0]["institution_code"] == "bank_a"
    assert ours[0]["review_status"] == "pending"

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"{platform.admin_api_url}/console/login")
        page.fill("input[name=username]", "reviewer")
        page.fill("input[name=password]", platform.credentials["reviewer"])
        page.click("button[type=submit]")
        page.goto(f"{platform.admin_api_url}/console/models")
        assert "模型审查" in page.content()
        row = page.locator("tr", has_text="bank_a.pd_logreg")
        row.locator("textarea[name=comment], input[name=comment]").first.fill("区分度与稳定性达标，准予使用")
        row.locator("button[value=approved]").first.click()
        page.wait_for_load_state()
        assert "已通过" in page.locator("tr", has_text="bank_a.pd_logreg").first.inner_text()
        browser.close()

    from model_registry.client import MlflowAdmin

    admin = MlflowAdmin(platform.mlflow_url, "admin", platform_secrets(platform)["mlflow_admin_password"])
    version = next(v for v in admin.list_model_versions() if v["name"] == "bank_a.pd_logreg")
    assert version["tags"]["regsandbox.review.status"] == "approved"
    assert version["tags"]["regsandbox.review.reviewer"] == "reviewer"

    # The modeller reads the decision on her own institution's models, and nothing of bank_b.
    own = httpx.get(f"{platform.admin_api_url}/api/v1/models", headers=api_headers(platform, "modeller_a")).json()
    assert {m["institution_code"] for m in own} == {"bank_a"}
    assert next(m for m in own if m["name"] == "bank_a.pd_logreg")["review_status"] == "approved"

    returned = httpx.post(f"{platform.admin_api_url}/api/v1/models/bank_b.pd_b/versions/1/review",
                          json={"decision": "returned", "comment": "缺少校准检验"}, headers=headers)
    # bank_b.pd_b has no version 1 yet: the regulator gets a clear "not found".
    assert returned.status_code == 404
    assert any(e["action"] == "models.review" and e["outcome"] == "success" for e in audit_events(platform))


def test_bad_input_is_refused_and_audited(platform):
    wrong = HubUser(platform.hub_url, "modeller_a", "not-the-password")
    assert "用户名或密码错误" in wrong.login().text

    token = httpx.post(f"{platform.admin_api_url}/api/v1/auth/token",
                       json={"username": "modeller_a", "password": "not-the-password"})
    assert token.status_code == 401
    assert token.json()["code"] == "INVALID_CREDENTIALS"

    subprocess.run([sys.executable, "-m", "admin_api.manage", "set-active", "reporter_c", "--disable"],
                   env=platform.env, cwd=PROJECT_ROOT, check=True, capture_output=True)
    disabled = httpx.post(f"{platform.admin_api_url}/api/v1/auth/token",
                          json={"username": "reporter_c", "password": platform.credentials["reporter_c"]})
    assert disabled.status_code == 403
    assert disabled.json()["code"] == "USER_DISABLED"

    # After sign-in the hub starts the server at once, so the refusal is the login's final page.
    reporter = HubUser(platform.hub_url, "reporter_a", platform.credentials["reporter_a"])
    signed_in = reporter.login()
    assert signed_in.status_code == 403
    assert "仅建模人员" in signed_in.text
    assert "无权访问" in signed_in.text
    assert "restarting your server" not in signed_in.text
    reporter.create_token()
    refused = reporter.start_server()
    assert refused.status_code == 403
    assert "仅建模人员" in refused.json()["message"]

    review = httpx.post(f"{platform.admin_api_url}/api/v1/models/bank_a.pd_logreg/versions/1/review",
                        json={"decision": "approved", "comment": "自己批准"},
                        headers=api_headers(platform, "modeller_a"))
    assert review.status_code == 403
    assert review.json()["code"]

    admin_headers = api_headers(platform, "sysadmin")
    notebooks = httpx.get(f"{platform.admin_api_url}/api/v1/report-notebooks", headers=admin_headers).json()
    inventory = next(n for n in notebooks if n["name"] == "模型清单")
    unapproved = httpx.post(f"{platform.admin_api_url}/api/v1/schedules", headers=admin_headers, json={
        "name": "未审批的清单", "notebook_id": inventory["id"], "cron": "0 8 * * 1",
        "recipients": ["staff@regulator.example"], "enabled": True})
    assert unapproved.status_code == 409
    assert unapproved.json()["code"] == "NOTEBOOK_NOT_APPROVED"

    outcomes = [(e["action"], e["outcome"]) for e in audit_events(platform)]
    assert sum(1 for _, outcome in outcomes if outcome in ("denied", "failed")) >= 4


def _mail_messages(platform) -> list[email.message.EmailMessage]:
    folder = platform.data_dir / "mail"
    return [email.message_from_bytes(path.read_bytes(), policy=policy.default)
            for path in sorted(folder.glob("*.eml"))]


def _report_runs(platform, headers) -> list[dict]:
    response = httpx.get(f"{platform.admin_api_url}/api/v1/report-runs", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def console_login(playwright, platform, username: str):
    """Open a Chromium page signed in to the console as ``username``."""
    browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
    page = browser.new_page()
    page.goto(f"{platform.admin_api_url}/console/login")
    page.fill("input[name=username]", username)
    page.fill("input[name=password]", platform.credentials[username])
    page.click("button[type=submit]")
    return browser, page


def test_approved_report_is_run_emailed_and_archived(platform):
    from playwright.sync_api import sync_playwright

    admin = api_headers(platform, "sysadmin")
    schedules_page = f"{platform.admin_api_url}/console/schedules"
    with sync_playwright() as playwright:
        # The regulator approves the report notebook on the 报告调度 page.
        browser, page = console_login(playwright, platform, "reviewer")
        page.goto(schedules_page)
        page.locator("tr", has_text="模型清单").locator("button", has_text="审批通过").first.click()
        page.wait_for_load_state()
        assert "已审批" in page.locator("tr", has_text="模型清单").first.inner_text()
        browser.close()

        # The system administrator schedules it there and starts one run now.
        browser, page = console_login(playwright, platform, "sysadmin")
        page.goto(schedules_page)
        page.fill("input[name=name]", "模型清单日报")
        page.select_option("select[name=notebook_id]", label=page.locator(
            "select[name=notebook_id] option", has_text="模型清单").first.inner_text())
        page.fill("input[name=cron]", "*/20 * * * * *")
        page.fill("textarea[name=recipients]", "staff@regulator.example")
        page.check("input[name=enabled]")
        page.click("button:has-text('新建调度')")
        page.wait_for_load_state()
        row = page.locator("tr", has_text="模型清单日报").first
        assert "*/20 * * * * *" in row.inner_text()
        row.locator("button", has_text="立即运行").click()
        page.wait_for_load_state()
        browser.close()

    schedule_id = next(s["id"] for s in httpx.get(f"{platform.admin_api_url}/api/v1/schedules",
                                                  headers=admin).json() if s["name"] == "模型清单日报")

    def finished(trigger):
        runs = [r for r in _report_runs(platform, admin) if r["schedule_id"] == schedule_id
                and r["trigger"] == trigger and r["status"] in ("succeeded", "failed")]
        return runs[0] if runs else None

    manual = wait_for(lambda: finished("manual"), 180, message="manual report run")
    assert manual["status"] == "succeeded", manual
    cron = wait_for(lambda: finished("cron"), 180, message="cron report run")
    assert cron["status"] == "succeeded", cron

    messages = _mail_messages(platform)
    assert messages
    message = messages[0]
    assert "staff@regulator.example" in message["To"]
    attachment = next(part for part in message.iter_attachments() if part.get_filename().endswith(".html"))
    html = attachment.get_content()
    assert "bank_a.pd_logreg" in html
    assert "已通过" in html

    archive = Path(manual["archive_path"])
    assert archive.is_relative_to(platform.data_dir / "reports")
    assert (archive / "report.html.rssg").exists()
    assert not (archive / "report.html").exists()
    assert platform.regsandbox("verify", str(archive / "manifest.json"), check=False).returncode == 0
    download = httpx.get(f"{platform.admin_api_url}/api/v1/report-runs/{manual['id']}/files/report.html",
                         headers=admin)
    assert download.status_code == 200, download.text
    assert 'filename="report.html"' in download.headers["content-disposition"]
    assert "bank_a.pd_logreg" in download.text


def test_unreachable_smtp_fails_the_run(platform):
    admin = api_headers(platform, "sysadmin")
    smtp_pid = int((platform.data_dir / "run" / "smtp.pid").read_text())
    os.killpg(smtp_pid, signal.SIGTERM)
    wait_for(lambda: not _port_open(platform.smtp_port), 30, 0.2, "SMTP sink stopped")

    schedule = next(s for s in httpx.get(f"{platform.admin_api_url}/api/v1/schedules", headers=admin).json()
                    if s["name"] == "模型清单日报")
    queued = httpx.post(f"{platform.admin_api_url}/api/v1/schedules/{schedule['id']}/runs", headers=admin,
                        json={"trigger": "manual"})
    run_id = queued.json()["id"]

    def finished():
        run = next(r for r in _report_runs(platform, admin) if r["id"] == run_id)
        return run if run["status"] in ("succeeded", "failed") else None

    run = wait_for(finished, 180, message="run with SMTP down")
    assert run["status"] == "failed"
    assert run["error_code"] == "SMTP_UNREACHABLE"
    finish_events = [e for e in audit_events(platform)
                     if e["action"] == "runs.finish" and e["resource"] == f"report_run:{run_id}"]
    assert finish_events
    assert finish_events[0]["outcome"] == "failed"
    assert not (platform.data_dir / "reports" / str(schedule["id"]) / str(run_id)).exists()


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.3)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def _sandbox_pids() -> list[int]:
    uids = {entry.pw_uid for entry in pwd.getpwall() if entry.pw_name.startswith(UNIX_PREFIX)}
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid in uids:
                    pids.append(int(entry))
            except FileNotFoundError:
                continue
    return pids


def test_down_stops_every_process(platform):
    assert _sandbox_pids(), "the sandbox server of modeller_a should still run before down"
    result = platform.regsandbox("down")
    assert result.returncode == 0
    platform.process.wait(timeout=120)
    assert platform.process.returncode == 0
    for name, port in platform.ports.items():
        assert not _port_open(port), f"{name} port {port} still open after down"
    assert _sandbox_pids() == []
