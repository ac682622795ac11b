"""The admission limits in front of admin_api (admin_api.admission)."""

from __future__ import annotations

import asyncio
import inspect

from fastapi.routing import APIRoute, iter_route_contexts

from admin_api.app import build_routes_only
from admin_api.admission import PASSWORD_CHECK_PATHS, PasswordCheckGate, RequestSlots


class SlowApp:
    """ASGI app that takes ``seconds`` per request to ``slow_paths`` and records how many it ran at once."""

    def __init__(self, seconds: float, slow_paths: frozenset[str] = PASSWORD_CHECK_PATHS) -> None:
        self.seconds = seconds
        self.slow_paths = slow_paths
        self.running = 0
        self.max_running = 0
        self.finished: list[str] = []

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        await asyncio.sleep(self.seconds if scope["path"] in self.slow_paths else 0)
        self.running -= 1
        self.finished.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def _scope(method: str, path: str) -> dict:
    return {"type": "http", "method": method, "path": path, "headers": []}


async def _call(app, scope: dict) -> None:  # type: ignore[no-untyped-def]
    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(_message: dict) -> None:
        return None

    await app(scope, receive, send)


def test_gate_admits_one_sign_in_at_a_time() -> None:
    inner = SlowApp(0.05)
    gate = PasswordCheckGate(inner, slots=1)

    async def burst() -> None:
        await asyncio.gather(*(_call(gate, _scope("POST", "/api/v1/auth/token")) for _ in range(4)))

    asyncio.run(burst())

    assert inner.max_running == 1
    assert len(inner.finished) == 4


def test_gate_lets_other_calls_pass_waiting_sign_ins() -> None:
    inner = SlowApp(0.2)
    gate = PasswordCheckGate(inner, slots=1)

    async def mixed() -> None:
        sign_ins = [asyncio.create_task(_call(gate, _scope("POST", "/console/login"))) for _ in range(3)]
        await asyncio.sleep(0.01)
        await _call(gate, _scope("GET", "/api/v1/me"))
        await _call(gate, _scope("POST", "/api/v1/messages/read-all"))
        await asyncio.gather(*sign_ins)

    asyncio.run(mixed())

    # Both other calls finished while the first sign-in still held the only slot.
    assert inner.finished[:2] == ["/api/v1/me", "/api/v1/messages/read-all"]
    assert inner.finished[2:] == ["/console/login"] * 3


def test_gate_covers_every_password_route() -> None:
    checking = set()
    for context in iter_route_contexts(build_routes_only().routes):
        route = context.original_route
        if isinstance(route, APIRoute) and "authenticate(" in inspect.getsource(route.endpoint):
            path = context.path or route.path
            assert (context.methods or route.methods) == {"POST"}, path
            checking.add(path)

    assert checking == PASSWORD_CHECK_PATHS


def test_request_slots_queue_excess_requests() -> None:
    inner = SlowApp(0.05, frozenset({"/api/v1/me"}))
    limited = RequestSlots(inner, slots=2)

    async def burst() -> None:
        await asyncio.gather(*(_call(limited, _scope("GET", "/api/v1/me")) for _ in range(5)))

    asyncio.run(burst())

    assert inner.max_running == 2
    assert len(inner.finished) == 5


def test_request_slots_pass_lifespan() -> None:
    seen: list[str] = []

    async def app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        seen.append(scope["type"])

    asyncio.run(RequestSlots(app, slots=1)({"type": "lifespan"}, None, None))  # type: ignore[arg-type]

    assert seen == ["lifespan"]


def test_gc_freeze_server_app_only(env) -> None:  # noqa: ANN001
    """The server process's long-lived objects leave the collector's generations; apps built in tests stay as they were."""
    import gc

    from fastapi.testclient import TestClient

    from admin_api.app import create_app

    gc.unfreeze()
    plain = create_app(env.settings, registry=env.registry, project_root=env.project_root)
    with TestClient(plain):
        assert gc.get_freeze_count() == 0
    server = create_app(env.settings, registry=env.registry, project_root=env.project_root, freeze_gc=True)
    try:
        with TestClient(server) as client:
            assert gc.get_freeze_count() > 10_000
            assert client.get("/healthz").status_code == 200
    finally:
        gc.unfreeze()
        server.state.engine.dispose()
        plain.state.engine.dispose()
