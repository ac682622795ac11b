"""Admission limits in front of the application, so bursts queue in the event loop instead of stalling it.

FastAPI runs every synchronous dependency and route in anyio worker threads (at most 40 at once),
and a request's database session keeps its pooled connection from its first query until it is
closed, across several of those thread hops. Without a limit, more requests than the pool has
connections could each hold a connection while waiting for a thread, while every thread waited for
a connection. Nothing then moved until the pool timeout (30 s) failed the waiting requests:
benchmarks/admin_load.py with 200 users on SQLite saw 400 of 499 calls of its 60 s window time
out, on a machine otherwise idle, and none with these limits. So at most :data:`REQUEST_SLOTS`
requests are inside the application at a time. The engine's pool has two connections for each
of them (``admin_api.db``), one for the request's session and one for an audit event that
``record_event`` commits on its own session.

Requests that check a password have a lower limit of their own, :data:`PASSWORD_CHECK_SLOTS`.
One argon2id check costs tens of milliseconds of CPU by design (REGSANDBOX_PASSWORD_HASH_*), so a
burst of sign-ins admitted at once all finished late together and left little CPU for other users.

Waiting requests hold no thread and no connection, and each limit admits them in arrival order.
"""

from __future__ import annotations

import asyncio
import os

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from admin_api.db import POOL_SIZE

REQUEST_SLOTS = POOL_SIZE
"""HTTP requests inside the application at once, half the pool's maximum (see the module docstring)."""

PASSWORD_CHECK_PATHS = frozenset({
    "/api/v1/auth/token",
    "/api/v1/auth/verify",
    "/api/v1/auth/password",
    "/api/v1/auth/totp/enrol",
    "/api/v1/auth/totp/confirm",
    "/console/login",
    "/console/password",
    "/console/totp/enrol",
    "/console/totp/confirm",
})
"""POST paths whose route calls ``services.authenticate``, which checks the password with argon2id."""

PASSWORD_CHECK_SLOTS = max(1, os.cpu_count() or 1)
"""Password-checking requests inside the application at once: one per CPU core, because one check keeps
a core busy (more with REGSANDBOX_PASSWORD_HASH_LANES above 1), so more at once only makes each of them slower."""


class _Slots:
    """An asyncio.Semaphore per event loop: uvicorn runs one loop, but each TestClient block starts its own."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore = asyncio.Semaphore(count)

    def current(self) -> asyncio.Semaphore:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._semaphore = loop, asyncio.Semaphore(self.count)
        return self._semaphore


class RequestSlots:
    """ASGI middleware that admits at most ``slots`` HTTP requests into ``app`` at a time."""

    def __init__(self, app: ASGIApp, slots: int = REQUEST_SLOTS) -> None:
        self.app = app
        self.slots = _Slots(slots)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        async with self.slots.current():
            await self.app(scope, receive, send)


class PasswordCheckGate:
    """ASGI middleware that admits at most ``slots`` requests to PASSWORD_CHECK_PATHS at a time."""

    def __init__(self, app: ASGIApp, slots: int = PASSWORD_CHECK_SLOTS) -> None:
        self.app = app
        self.slots = _Slots(slots)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in PASSWORD_CHECK_PATHS:
            async with self.slots.current():
                await self.app(scope, receive, send)
            return
        await self.app(scope, receive, send)


def install_admission(app: FastAPI) -> None:
    """Add both limits as the outermost middleware of ``app``: the password gate first, then the request slots.

    So a sign-in waiting at the password gate takes no request slot. Call this after every other
    ``app.middleware``/``add_middleware``, because the middleware added last runs first.
    """
    app.add_middleware(RequestSlots)
    app.add_middleware(PasswordCheckGate)
