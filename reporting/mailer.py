"""Sending report emails with Chinese subject, body and attachment names over SMTP.

When SMTP credentials are stored in the encrypted platform secrets (``regsandbox secrets
set-smtp``), the mailer authenticates with AUTH PLAIN, or AUTH LOGIN when the relay offers only
that. It upgrades the connection with STARTTLS when the relay offers it, and sends credentials
without TLS only to a relay on the loopback interface.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import smtplib
import ssl
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

SmtpLogin = tuple[str, str]
"""User name and password for SMTP AUTH."""


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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _authenticate(client: smtplib.SMTP, host: str, endpoint: str, login: SmtpLogin) -> None:
    """Log in with AUTH PLAIN or LOGIN, after STARTTLS when offered; user name and password are sent as UTF-8.

    smtplib's own ``login`` encodes credentials as ASCII, so the commands are sent here directly.
    """
    username, password = login
    client.ehlo()
    if client.has_extn("starttls"):
        client.starttls(context=ssl.create_default_context())
        client.ehlo()
    elif not _is_loopback(host):
        raise MailDeliveryError(
            "SMTP_TLS_REQUIRED",
            f"SMTP 服务器 {endpoint} 不支持 STARTTLS，平台不会以明文发送 SMTP 密码。"
            "请在邮件服务器上启用 STARTTLS，或运行 `regsandbox secrets clear-smtp` 改为不认证发送。",
        )
    mechanisms = (client.esmtp_features.get("auth") or "").upper().split()
    if "PLAIN" in mechanisms:
        code, response = client.docmd("AUTH", "PLAIN " + _b64(f"\0{username}\0{password}"))
    elif "LOGIN" in mechanisms:
        code, response = client.docmd("AUTH", "LOGIN")
        if code == 334:
            code, response = client.docmd(_b64(username))
        if code == 334:
            code, response = client.docmd(_b64(password))
    else:
        raise MailDeliveryError(
            "SMTP_AUTH_UNSUPPORTED",
            f"SMTP 服务器 {endpoint} 不支持 AUTH PLAIN 或 AUTH LOGIN 认证（支持：{' '.join(mechanisms) or '无'}）。"
            "请确认邮件服务器配置，或运行 `regsandbox secrets clear-smtp` 改为不认证发送。",
        )
    if code != 235:
        raise MailDeliveryError(
            "SMTP_AUTH_FAILED",
            f"SMTP 服务器 {endpoint} 拒绝了用户 {username} 的登录（响应码 {code}）。"
            "请核对凭据后运行 `regsandbox secrets set-smtp` 重新设置。",
        )
    logger.info("authenticated to SMTP relay %s as %s", endpoint, username)


def send_report(
    settings: Settings, recipients: list[str], subject: str, body_text: str, attachments: list[Attachment],
    *, login: SmtpLogin | None = None,
) -> None:
    """Send one report email through ``settings.smtp_host:smtp_port``, with SMTP AUTH when ``login`` is given.

    Raises MailDeliveryError when the relay is unreachable, times out, rejects the login or the message.
    """
    addresses = validate_recipients(recipients)
    message = build_message(settings.mail_from, addresses, subject, body_text, attachments)
    endpoint = f"{settings.smtp_host}:{settings.smtp_port}"

    try:
        with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=settings.smtp_timeout) as client:
            if login is not None:
                _authenticate(client, settings.smtp_host, endpoint, login)
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
