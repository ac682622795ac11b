"""SMTP AUTH with credentials from the encrypted platform secrets, against an aiosmtpd relay on 127.0.0.1."""

from __future__ import annotations

import os
import smtplib
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from regsandbox_core.secrets import load_platform_secrets, set_smtp_credentials
from regsandbox_core.settings import PROJECT_ROOT
from reporting.mailer import MailDeliveryError, _authenticate, send_report
from reporting.runner import run_report

from .conftest import make_run, write_notebook

# The relay runs on loopback without TLS, which aiosmtpd warns about; the mailer allows it only there.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")

USERNAME = "report-mailer"
PASSWORD = "口令-p@ss 2026"


@dataclass
class AuthRelay:
    """Messages and successful logins seen by the relay."""

    messages: list[bytes] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)

    def authenticate(self, server, session, envelope, mechanism, auth_data):  # type: ignore[no-untyped-def]
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login, password = auth_data.login.decode("utf-8"), auth_data.password.decode("utf-8")
        if (login, password) != (USERNAME, PASSWORD):
            return AuthResult(success=False, handled=False)
        self.logins.append((mechanism, login))
        return AuthResult(success=True)

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.messages.append(envelope.original_content)
        return "250 OK"


def _start_relay(port: int, exclude: list[str] | None = None) -> tuple[Controller, AuthRelay]:
    relay = AuthRelay()
    controller = Controller(
        relay, hostname="127.0.0.1", port=port, authenticator=relay.authenticate, auth_required=True,
        auth_require_tls=False, auth_exclude_mechanism=exclude or [],
    )
    controller.start()
    return controller, relay


@pytest.fixture
def relay(settings):  # type: ignore[no-untyped-def]
    controller, state = _start_relay(settings.smtp_port)
    yield state
    controller.stop()


def _send(settings, login=None) -> None:  # type: ignore[no-untyped-def]
    send_report(settings, ["reviewer@regulator.example.cn"], "【监管沙箱报表】测试", "正文", [], login=login)


def test_plain_login_sends(settings, relay) -> None:
    _send(settings, (USERNAME, PASSWORD))

    assert relay.logins == [("PLAIN", USERNAME)]
    assert len(relay.messages) == 1


def test_login_mechanism_when_plain_missing(settings) -> None:
    controller, relay = _start_relay(settings.smtp_port, exclude=["PLAIN"])
    try:
        _send(settings, (USERNAME, PASSWORD))
    finally:
        controller.stop()

    assert relay.logins == [("LOGIN", USERNAME)]
    assert len(relay.messages) == 1


def test_wrong_password_rejected(settings, relay) -> None:
    with pytest.raises(MailDeliveryError) as raised:
        _send(settings, (USERNAME, "wrong"))

    assert raised.value.code == "SMTP_AUTH_FAILED"
    assert USERNAME in raised.value.message
    assert "regsandbox secrets set-smtp" in raised.value.message
    assert relay.messages == []


def test_no_login_rejected_by_relay(settings, relay) -> None:
    with pytest.raises(MailDeliveryError) as raised:
        _send(settings)

    assert raised.value.code == "SMTP_REJECTED"
    assert relay.messages == []


def test_no_cleartext_password_to_remote_relay(settings, relay) -> None:
    """Without STARTTLS, credentials go only to a loopback relay; the check uses the configured host name."""
    with smtplib.SMTP("127.0.0.1", settings.smtp_port, timeout=5) as client:
        with pytest.raises(MailDeliveryError) as raised:
            _authenticate(client, "mail.regulator.example", "mail.regulator.example:25", (USERNAME, PASSWORD))

    assert raised.value.code == "SMTP_TLS_REQUIRED"
    assert relay.logins == []


def test_cli_stores_credentials_from_stdin(settings, secrets) -> None:
    environment = {name: value for name, value in os.environ.items() if name != "REGSANDBOX_MASTER_KEY"}
    environment["REGSANDBOX_DATA_DIR"] = str(settings.data_dir)
    command = [sys.executable, "-m", "launcher.cli", "secrets", "set-smtp", "--username", USERNAME]
    without_database = subprocess.run(command, input=PASSWORD + "\n", env=environment, cwd=PROJECT_ROOT,
                                      capture_output=True, text=True, timeout=60)
    migrated = subprocess.run([sys.executable, "-m", "admin_api.manage", "migrate"], env=environment,
                              cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert migrated.returncode == 0, migrated.stderr

    result = subprocess.run(command, input=PASSWORD + "\n", env=environment, cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=60)

    assert without_database.returncode == 1
    assert "audit_database_missing" in without_database.stderr
    assert result.returncode == 0, result.stderr
    assert "已将 SMTP 用户" in result.stdout
    assert PASSWORD not in result.stdout + result.stderr
    stored = load_platform_secrets(settings)
    assert (stored.smtp_username, stored.smtp_password) == (USERNAME, PASSWORD)
    assert stored.service_token == secrets.service_token

    empty = subprocess.run(command, input="\n", env=environment, cwd=PROJECT_ROOT, capture_output=True, text=True,
                           timeout=60)
    assert empty.returncode == 1
    assert "SMTP_CREDENTIALS_INVALID" in empty.stderr
    assert load_platform_secrets(settings).smtp_password == PASSWORD

    cleared = subprocess.run([*command[:4], "clear-smtp"], env=environment, cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=60)
    assert cleared.returncode == 0, cleared.stderr
    assert load_platform_secrets(settings).smtp_username is None
    with sqlite3.connect(settings.data_dir / "admin.db") as connection:
        events = connection.execute(
            "SELECT action, outcome, role, detail FROM audit_events WHERE action LIKE 'secrets.%' ORDER BY id"
        ).fetchall()
    assert [(action, outcome) for action, outcome, _role, _detail in events] == [
        ("secrets.set_smtp", "success"), ("secrets.set_smtp", "failed"), ("secrets.clear_smtp", "success"),
    ]
    assert {role for _action, _outcome, role, _detail in events} == {"operator"}
    assert all(PASSWORD not in (detail or "") for _action, _outcome, _role, detail in events)


def test_report_run_authenticates(settings, keystore, secrets, project_root, relay, report_settings) -> None:
    set_smtp_credentials(settings, USERNAME, PASSWORD)
    path = write_notebook(project_root, "notebooks/reports/ok.ipynb", ["print('报表完成')"])

    result = run_report(settings, make_run(51, path, project_root, keystore=keystore),
                        secrets=load_platform_secrets(settings), project_root=project_root,
                        report_settings=report_settings)

    assert result.status == "succeeded", result.error_message
    assert relay.logins == [("PLAIN", USERNAME)]
    assert len(relay.messages) == 1
