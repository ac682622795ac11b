"""Sending report emails with Chinese subject, body and attachment names over SMTP."""

from __future__ import annotations

import logging
import re
import smtplib
from email.message import EmailMessage
from email.utils import formatdate, make_msgid

from regsandbox_core.errors import RegsandboxError
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

# A practical address check: one @, no spaces or control characters, a dot in the domain.
# It also keeps CR/LF out of the headers.
_ADDRESS = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")

Attachment = tuple[str, bytes, str]
"""One attachment: file name (may be Chinese), content, MIME type such as ``text/html``."""


class MailDeliveryError(RegsandboxError):
    """The report email could not be handed to the SMTP relay.

    ``code`` is ``SMTP_UNREACHABLE`` when no connection could be made or the connection broke,
    ``SMTP_REJECTED`` when the relay refused the sender, a recipient or the message, and
    ``RECIPIENT_INVALID`` when an address is malformed.
    """

    status = 502


def validate_recipients(recipients: list[str]) -> list[str]:
    """Return the stripped addresses, or raise MailDeliveryError naming the first invalid one."""
    cleaned = [address.strip() for address in recipients]
    if not cleaned:
        raise MailDeliveryError("RECIPIENT_INVALID", "收件人列表为空。请在报表计划中至少填写一个收件邮箱。", status=400)
    for address in cleaned:
        if not _ADDRESS.match(address):
            raise MailDeliveryError(
                "RECIPIENT_INVALID",
                f"收件邮箱 {address!r} 格式无效。请在报表计划中改为 name@example.com 形式的地址。",
                status=400,
            )
    return cleaned


def build_message(
    sender: str, recipients: list[str], subject: str, body_text: str, attachments: list[Attachment]
) -> EmailMessage:
    """Build a UTF-8 MIME message; non-ASCII headers use RFC 2047 and file names RFC 2231."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=False, usegmt=True)
    message["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    # Base64 keeps the Chinese body intact through relays that do not offer 8BITMIME.
    message.set_content(body_text, charset="utf-8", cte="base64")
    for filename, content, mimetype in attachments:
        maintype, _, subtype = mimetype.partition("/")
        params = {"charset": "utf-8"} if maintype == "text" else {}
        message.add_attachment(
            content, maintype=maintype, subtype=subtype or "octet-stream", filename=filename, params=params
        )
    return message


def send_report(
    settings: Settings, recipients: list[str], subject: str, body_text: str, attachments: list[Attachment]
) -> None:
    """Send one report email through ``settings.smtp_host:smtp_port``.

    Raises MailDeliveryError when the relay is unreachable, times out or rejects the message.
    """
    addresses = validate_recipients(recipients)
    message = build_message(settings.mail_from, addresses, subject, body_text, attachments)
    endpoint = f"{settings.smtp_host}:{settings.smtp_port}"

    try:
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout) as client:
            refused = client.send_message(message, from_addr=settings.mail_from, to_addrs=addresses)
    except smtplib.SMTPRecipientsRefused as error:
        raise MailDeliveryError(
            "SMTP_REJECTED",
            f"SMTP 服务器 {endpoint} 拒收全部收件人（{', '.join(error.recipients)}）。请核对报表计划中的收件邮箱。",
        ) from error
    except smtplib.SMTPResponseException as error:
        raise MailDeliveryError(
            "SMTP_REJECTED",
            f"SMTP 服务器 {endpoint} 拒绝了报表邮件（响应码 {error.smtp_code}）。请联系邮件服务器管理员。",
        ) from error
    except (OSError, smtplib.SMTPException) as error:
        # ConnectionRefusedError, TimeoutError and SMTPServerDisconnected all land here.
        raise MailDeliveryError(
            "SMTP_UNREACHABLE",
            f"无法连接 SMTP 服务器 {endpoint}（{type(error).__name__}）。"
            "请检查 REGSANDBOX_SMTP_HOST 和 REGSANDBOX_SMTP_PORT 配置，并确认邮件服务已启动。",
        ) from error

    if refused:
        logger.warning("SMTP relay %s rejected %d of %d recipients", endpoint, len(refused), len(addresses))
    logger.info(
        "sent report email to %d recipients via %s, %d attachments", len(addresses) - len(refused), endpoint,
        len(attachments),
    )
