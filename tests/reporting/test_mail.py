"""Mailer and SMTP sink: Chinese MIME encoding, .eml storage and unreachable relays."""

from __future__ import annotations

import stat

import pytest

from reporting.mailer import MailDeliveryError, send_report
from tests.conftest import free_port

from .conftest import read_mail


def test_sink_stores_chinese_message(settings, smtp_sink):
    html = "<html><body><p>模型清单：bank_a.scorecard</p></body></html>".encode("utf-8")

    send_report(
        settings,
        ["reviewer@regulator.example.cn", "lead@regulator.example.cn"],
        "【监管沙箱报表】模型清单（2026-12-04）",
        "您好：\n附件是模型清单。\n",
        [("模型清单-20261204.html", html, "text/html")],
    )

    files = list(settings.mail_dir.glob("*.eml"))
    assert len(files) == 1
    assert files[0].name.endswith(".eml")
    assert stat.S_IMODE(settings.mail_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert not [path for path in settings.mail_dir.iterdir() if path.name.startswith(".")]

    (message,) = read_mail(settings)
    assert message["Subject"] == "【监管沙箱报表】模型清单（2026-12-04）"
    assert message["X-Envelope-To"] == "<reviewer@regulator.example.cn>, <lead@regulator.example.cn>"
    assert message.get_body(("plain",)).get_content().replace("\r\n", "\n") == "您好：\n附件是模型清单。\n"
    (attachment,) = list(message.iter_attachments())
    assert attachment.get_filename() == "模型清单-20261204.html"
    assert attachment.get_content_type() == "text/html"
    assert attachment.get_payload(decode=True) == html


def test_sink_log_has_no_body(settings, smtp_sink):
    send_report(settings, ["a@example.cn"], "主题", "正文机密内容", [])

    smtp_sink.send_signal(15)
    smtp_sink.wait(timeout=15)
    log = smtp_sink.stderr.read()

    assert "stored message from=" in log
    assert "a@example.cn" in log
    assert "正文机密内容" not in log


def test_unreachable_relay_raises(settings):
    settings.smtp_port = free_port()

    with pytest.raises(MailDeliveryError) as caught:
        send_report(settings, ["a@example.cn"], "主题", "正文", [])

    assert caught.value.code == "SMTP_UNREACHABLE"
    assert f"127.0.0.1:{settings.smtp_port}" in caught.value.message
    assert "REGSANDBOX_SMTP_HOST" in caught.value.message
    assert "REGSANDBOX_SMTP_PORT" in caught.value.message


@pytest.mark.parametrize("address", ["", "no-at-sign", "a@example.cn\r\nBcc: x@example.cn", "a b@example.cn"])
def test_invalid_recipient_rejected(settings, address):
    with pytest.raises(MailDeliveryError) as caught:
        send_report(settings, [address], "主题", "正文", [])

    assert caught.value.code == "RECIPIENT_INVALID"


def test_empty_recipient_list_rejected(settings):
    with pytest.raises(MailDeliveryError) as caught:
        send_report(settings, [], "主题", "正文", [])

    assert caught.value.code == "RECIPIENT_INVALID"
