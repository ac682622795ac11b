"""Embedded SMTP sink: stores every received message as an ``.eml`` file under ``<data_dir>/mail``.

Run as ``python -m reporting.smtp_sink``. It listens on ``REGSANDBOX_HOST:REGSANDBOX_SMTP_PORT``,
accepts any sender and recipient and delivers nothing further, so a single-machine platform can
show the report emails it sent. It stops cleanly on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from regsandbox_core.logs import configure_logging
from regsandbox_core.secrets import write_private_file
from regsandbox_core.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def message_filename(received_at: datetime) -> str:
    """Return ``<UTC timestamp>-<uuid>.eml``; names sort by arrival time."""
    return f"{received_at.strftime('%Y%m%dT%H%M%S.%fZ')}-{uuid.uuid4().hex}.eml"


def prepare_mail_dir(mail_dir: Path) -> None:
    """Create the mail folder with mode 0700 (or tighten an existing one)."""
    mail_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(mail_dir, 0o700)


class MailDirHandler:
    """aiosmtpd handler that writes each message atomically (temporary file, then rename) with mode 0600."""

    def __init__(self, mail_dir: Path) -> None:
        self.mail_dir = mail_dir

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        # The envelope is not part of the message (Bcc recipients are not in any header), so it is kept as
        # leading headers, the way delivery agents add Return-Path and Delivered-To.
        envelope_headers = (
            f"X-Envelope-From: <{envelope.mail_from}>\r\n"
            f"X-Envelope-To: {', '.join(f'<{address}>' for address in envelope.rcpt_tos)}\r\n"
        ).encode("utf-8")
        path = self.mail_dir / message_filename(datetime.now(timezone.utc))

        try:
            await asyncio.get_running_loop().run_in_executor(None, write_private_file, path, envelope_headers + content)
        except OSError:
            logger.exception("failed to store message from %s in %s", envelope.mail_from, self.mail_dir)
            return "451 Requested action aborted: local error in processing"

        logger.info(
            "stored message from=%s recipients=%s size=%d file=%s",
            envelope.mail_from, ",".join(envelope.rcpt_tos), len(content), path.name,
        )
        return "250 Message accepted for delivery"


def build_controller(settings: Settings) -> Controller:
    """Return a stopped aiosmtpd controller on ``settings.host:settings.smtp_port`` writing to the mail folder."""
    prepare_mail_dir(settings.mail_dir)
    return Controller(MailDirHandler(settings.mail_dir), hostname=settings.host, port=settings.smtp_port)


def main() -> int:
    """Run the sink until SIGTERM or SIGINT; return the process exit status."""
    configure_logging()
    settings = get_settings()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda received, _frame: stop.set())

    controller = build_controller(settings)
    try:
        controller.start()
    except (OSError, RuntimeError, TimeoutError) as error:
        logger.error("SMTP sink failed to start on %s:%d: %s", settings.host, settings.smtp_port, error)
        print(
            f"SMTP 收件服务无法在 {settings.host}:{settings.smtp_port} 启动（{error}）。"
            "请确认该端口未被占用，或通过 REGSANDBOX_SMTP_PORT 改用其他端口。",
            file=sys.stderr,
        )
        return 1

    logger.info("SMTP sink listening on %s:%d, storing messages in %s", settings.host, settings.smtp_port, settings.mail_dir)
    while not stop.wait(timeout=1.0):
        pass
    controller.stop()
    logger.info("SMTP sink stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
