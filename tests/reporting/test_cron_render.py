"""Cron parsing, HTML rendering without code, and the scheduler as a process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from regsandbox_core.settings import PROJECT_ROOT
from regsandbox_core.cron import CronExpressionError, crontab_weekdays, parse_cron
from reporting.render import render_html

SHANGHAI = ZoneInfo("Asia/Shanghai")


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("*", "*"),
        ("0", "sun"),
        ("7", "sun"),
        ("1-5", "mon,tue,wed,thu,fri"),
        ("*/2", "sun,tue,thu,sat"),
        ("1,3", "mon,wed"),
        ("mon-fri", "mon-fri"),
    ],
)
def test_crontab_weekdays(field, expected):
    assert crontab_weekdays(field) == expected


def test_five_field_sunday_is_zero():
    trigger = parse_cron("0 8 * * 0", "Asia/Shanghai")

    fire = trigger.get_next_fire_time(None, datetime(2026, 12, 4, 12, 0, tzinfo=SHANGHAI))

    assert fire == datetime(2026, 12, 6, 8, 0, tzinfo=SHANGHAI)
    assert fire.strftime("%A") == "Sunday"


def test_six_field_has_seconds():
    trigger = parse_cron("*/15 * * * * *", "Asia/Shanghai")

    fire = trigger.get_next_fire_time(None, datetime(2026, 12, 4, 12, 0, 1, tzinfo=SHANGHAI))

    assert fire == datetime(2026, 12, 4, 12, 0, 15, tzinfo=SHANGHAI)


@pytest.mark.parametrize("expression", ["", "* * * *", "* * * * * * *", "61 * * * *", "0 8 * * 9", "0 8 * * x/y"])
def test_invalid_cron_rejected(expression):
    with pytest.raises(CronExpressionError) as caught:
        parse_cron(expression, "Asia/Shanghai")

    assert caught.value.code == "INVALID_CRON"
    assert repr(expression) in caught.value.message


def test_html_excludes_code_source():
    notebook = new_notebook(cells=[
        new_markdown_cell("# 资本充足率报表\n说明文字"),
        new_code_cell(
            "hidden_variable_name = 42\nprint('显示的输出')",
            execution_count=1,
            outputs=[new_output("stream", name="stdout", text="显示的输出\n")],
        ),
    ])
    notebook.metadata["regsandbox"] = {"title": "资本充足率报表"}

    html = render_html(notebook)

    assert "hidden_variable_name" not in html
    assert "显示的输出" in html
    assert "说明文字" in html
    assert "<title>资本充足率报表</title>" in html
    assert "In&nbsp;[1]" not in html
    assert 'src="https://' not in html


def test_scheduler_process_stops_on_sigterm(settings, secrets, tmp_path):
    env = dict(os.environ)
    env.update(
        REGSANDBOX_DATA_DIR=str(settings.data_dir),
        REGSANDBOX_ADMIN_API_PORT=str(settings.admin_api_port),
        REGSANDBOX_SCHEDULER_POLL_SECONDS="0.2",
    )
    log_path = tmp_path / "scheduler.log"
    with open(log_path, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "reporting.scheduler"], env=env, cwd=PROJECT_ROOT,
            stdout=subprocess.DEVNULL, stderr=log_file,
        )
    try:
        # The first poll fails because nothing listens on the admin_api port; wait for its warning.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "retrying at the next poll" not in log_path.read_text(encoding="utf-8"):
            assert process.poll() is None, log_path.read_text(encoding="utf-8")
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text(encoding="utf-8")

    assert process.returncode == 0, log
    assert "scheduler started" in log
    assert "retrying at the next poll" in log
    assert "scheduler stopped" in log
    assert secrets.service_token not in log


def test_scheduler_without_secrets_exits(tmp_path):
    env = dict(os.environ, REGSANDBOX_DATA_DIR=str(tmp_path / "empty"))

    completed = subprocess.run(
        [sys.executable, "-m", "reporting.scheduler"], env=env, cwd=PROJECT_ROOT,
        capture_output=True, text=True, timeout=30,
    )

    assert completed.returncode == 1
    assert "regsandbox init" in completed.stderr
