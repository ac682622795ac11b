"""Request body limits, enforced by FastAPI before a route reads the body (413 ``PAYLOAD_TOO_LARGE``)."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 1024 * 1024
"""Every JSON and form request; a route that accepts uploads sets MAX_UPLOAD_BODY_BYTES instead."""
MAX_UPLOAD_BODY_BYTES = 12 * 1024 * 1024
"""Import uploads: above the largest import file (institutions 10 MB, users 5 MB), leaving room for the multipart framing."""
TOO_LARGE_CODE = "PAYLOAD_TOO_LARGE"
TOO_LARGE_DETAIL = ("请求体超过上限（一般请求 1 MB，机构和用户导入文件 12 MB，报表文件 2 GB），未做任何修改。"
                    "请缩小请求内容；导入文件请拆分为多个较小的文件后分别导入。")


class ChineseTooLarge:
    """ASGI middleware that turns Starlette's plain-text 413 into the platform's Chinese JSON error.

    Starlette rejects a declared ``Content-Length`` above the route's limit with a plain-text
    "Content Too Large" response that bypasses the exception handlers, so this middleware rewrites it.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        replaced = False

        async def send_translated(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 413:
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if content_type.startswith(b"text/plain"):
                    replaced = True
                    body = json.dumps({"code": TOO_LARGE_CODE, "detail": TOO_LARGE_DETAIL},
                                      ensure_ascii=False).encode("utf-8")
                    headers = [(name, value) for name, value in message.get("headers", [])
                               if name not in (b"content-type", b"content-length")]
                    headers += [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode("ascii"))]
                    await send({**message, "headers": headers})
                    await send({"type": "http.response.body", "body": body})
                    return
            if replaced and message["type"] == "http.response.body":
                return  # the plain-text body of the replaced response
            await send(message)

        await self.app(scope, receive, send_translated)
