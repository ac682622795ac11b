"""UserDirectory against the real admin_api served by uvicorn on 127.0.0.1, on SQLite and PostgreSQL.

A small ASGI wrapper in front of the app records the query of every ``GET /api/v1/users`` and can
make chosen requests fail or return an empty list. Each test first moves every user's
``updated_at`` one hour back, so a listing with ``updated_since`` returns exactly the users the
test changed. The directory's clock is a :class:`FakeClock` that starts at the real time and is
moved by hand; admin_api stamps ``updated_at`` with the real time.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl
from zoneinfo import ZoneInfo

import httpx
import pytest
import uvicorn
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from admin_api.app import create_app
from admin_api.db import make_engine, make_session_factory
from admin_api.migrate import upgrade_to_head
from admin_api.models import Institution, User
from admin_api.seed import DEMO_USERS, seed_demo
from regsandbox_core.admin_users import UserDirectory, fetch_all_users, format_updated_since
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.platform_keys import ensure_platform_keys
from regsandbox_core.secrets import ensure_platform_secrets
from regsandbox_core.settings import Settings
from tests.admin_api.conftest import DictRegistry, create_postgres_database, drop_postgres_database, make_project_root
from tests.conftest import free_port

SERVICE = "hub"
EXTRA_USERS = 30
"""Users added to the demo users, so that small pages need several requests."""


class FakeClock:
    """Aware UTC time that only moves when a test calls :meth:`advance`."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class UsersRecorder:
    """ASGI wrapper that records ``GET /api/v1/users`` queries and can fail or empty chosen ones."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.queries: list[dict[str, str]] = []
        self.fail_after: int | None = None
        """Number of further user listing requests to pass on before one fails with HTTP 503."""
        self.empty = False
        """Return an empty list for every user listing request."""

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/api/v1/users":
            self.queries.append(dict(parse_qsl(scope["query_string"].decode("ascii"))))
            if self.fail_after is not None:
                if self.fail_after == 0:
                    self.fail_after = None
                    await _send_json(send, 503, {"code": "TEST_FAILURE", "detail": "测试设定的失败"}, {})
                    return
                self.fail_after -= 1
            if self.empty:
                await _send_json(send, 200, [], {"x-total-count": "0"})
                return
        await self.app(scope, receive, send)


async def _send_json(send: Any, status: int, body: Any, headers: dict[str, str]) -> None:
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(name.encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


@dataclass
class AdminApi:
    url: str
    service_token: str
    recorder: UsersRecorder
    session_factory: sessionmaker[Session]
    sysadmin: httpx.Client
    users: list[str] = field(default_factory=list)

    def directory(self, clock: FakeClock, **options: Any) -> UserDirectory:
        return UserDirectory(self.url, self.service_token, SERVICE, clock=clock, **options)

    def truth(self) -> dict[str, dict[str, Any]]:
        """Return a full listing of all users, as fetch_all_users gives it, without recording its requests."""
        recorded = len(self.recorder.queries)
        rows = fetch_all_users(self.url, self.service_token, SERVICE)
        del self.recorder.queries[recorded:]
        return {row["username"]: row for row in rows}

    def backdate_all(self) -> None:
        """Move every user's last change one hour back, so ``updated_since`` lists only later changes."""
        with self.session_factory() as session:
            session.execute(update(User).values(updated_at=datetime.now(UTC) - timedelta(hours=1)))
            session.commit()

    def change(self, method: str, path: str, **kwargs: Any) -> None:
        response = self.sysadmin.request(method, path, **kwargs)
        assert response.status_code in (200, 201), response.text


def _start(app: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("admin_api did not start on 127.0.0.1 within 30 s")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def _build(database_url: str, data_dir: Path, project_root: Path) -> Iterator[AdminApi]:
    settings = Settings(data_dir=data_dir, database_url=database_url, mlflow_port=free_port(), totp_required_roles=[])
    platform_secrets = ensure_platform_secrets(settings)
    upgrade_to_head(database_url)
    engine = make_engine(database_url)
    session_factory = make_session_factory(engine)

    with session_factory() as session:
        passwords = seed_demo(session, settings, project_root)
        bank_a = session.query(Institution).filter_by(code="bank_a").one()
        for index in range(EXTRA_USERS):
            session.add(User(username=f"bulk_{index:03d}", display_name=f"批量用户{index}",
                             email=f"bulk_{index:03d}@bank-a.example", role="reporter", institution_id=bank_a.id,
                             password_hash="not-a-hash", is_active=True))
        session.commit()
        codes = [code for (code,) in session.query(Institution.code).order_by(Institution.code)]
    ensure_platform_keys(settings, codes, on_event=None)

    app = create_app(settings, registry=DictRegistry(), project_root=project_root)
    recorder = UsersRecorder(app)
    server, thread, url = _start(recorder)

    sysadmin = httpx.Client(base_url=f"{url}/api/v1", timeout=30, trust_env=False)
    try:
        token = sysadmin.post("/auth/token", json={"username": "sysadmin", "password": passwords["sysadmin"]})
        assert token.status_code == 200, token.text
        sysadmin.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        yield AdminApi(url, platform_secrets.service_token, recorder, session_factory, sysadmin)
    finally:
        sysadmin.close()
        server.should_exit = True
        thread.join(timeout=30)
        app.state.engine.dispose()
        engine.dispose()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def admin_api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminApi]:
    data_dir = tmp_path_factory.mktemp(f"directory-{request.param}")
    project_root = make_project_root(tmp_path_factory.mktemp(f"directory-project-{request.param}"))
    if request.param == "sqlite":
        yield from _build(f"sqlite:///{data_dir / 'admin.db'}", data_dir, project_root)
        return
    name, url = create_postgres_database()
    try:
        yield from _build(url, data_dir, project_root)
    finally:
        drop_postgres_database(name)


@pytest.fixture
def api(admin_api: AdminApi) -> AdminApi:
    """The module's admin_api with all changes backdated, nothing recorded and no failure planned."""
    admin_api.backdate_all()
    admin_api.recorder.queries.clear()
    admin_api.recorder.fail_after = None
    admin_api.recorder.empty = False
    return admin_api


def test_first_refresh_lists_all_users(api: AdminApi) -> None:
    directory = api.directory(FakeClock(), page_size=10)

    users = directory.refresh()

    total = len(DEMO_USERS) + EXTRA_USERS
    assert users == api.truth()
    assert len(users) == total
    assert directory.last_full
    assert directory.last_rows == total
    assert len(api.recorder.queries) == 5  # pages of 10, 10, 10, 10 and 2 users
    assert all("updated_since" not in query for query in api.recorder.queries)


def test_change_poll_merges_changes(api: AdminApi) -> None:
    clock = FakeClock()
    directory = api.directory(clock)
    before = directory.refresh()
    first_start = clock.now
    api.recorder.queries.clear()

    api.change("POST", "/users/bulk_001/disable")
    api.change("PATCH", "/users/bulk_002", json={"role": "modeller"})
    api.change("PATCH", "/users/bulk_003", json={"institution_code": "bank_b"})
    clock.advance(15)
    after = directory.refresh()

    assert [query.get("updated_since") for query in api.recorder.queries] == [
        format_updated_since(first_start - timedelta(seconds=120))
    ]
    assert not directory.last_full
    assert directory.last_rows == 3
    assert after == api.truth()
    assert after["bulk_001"]["is_active"] is False
    assert before["bulk_001"]["is_active"] is True
    assert after["bulk_002"]["role"] == "modeller"
    assert after["bulk_003"]["institution_code"] == "bank_b"
    assert set(after) == set(before)

    # The next poll counts from the start of this one, and a re-enabled user shows as active again.
    second_start = clock.now
    api.change("POST", "/users/bulk_001/enable")
    clock.advance(15)
    again = directory.refresh()

    assert api.recorder.queries[-1]["updated_since"] == format_updated_since(second_start - timedelta(seconds=120))
    assert again["bulk_001"]["is_active"] is True
    assert again == api.truth()


def test_change_poll_spans_pages(api: AdminApi) -> None:
    clock = FakeClock()
    directory = api.directory(clock, page_size=2)
    directory.refresh()
    api.recorder.queries.clear()

    for name in ("bulk_010", "bulk_011", "bulk_012"):
        api.change("POST", f"/users/{name}/disable")
    created = f"dirnew_{int(time.time() * 1000) % 10**8}"
    api.change("POST", "/users", json={"username": created, "display_name": "新建用户", "role": "reporter",
                                       "email": f"{created}@bank-a.example", "institution_code": "bank_a",
                                       "password": "Init-Passw0rd-2026"})
    clock.advance(15)
    users = directory.refresh()

    assert len(api.recorder.queries) == 2  # 4 changed users in pages of 2
    assert all("updated_since" in query for query in api.recorder.queries)
    assert directory.last_rows == 4
    assert users[created]["is_active"] is True
    assert users == api.truth()


def test_full_listing_after_full_every(api: AdminApi) -> None:
    clock = FakeClock()
    directory = api.directory(clock, full_every=300)
    directory.refresh()
    for _round in range(19):
        clock.advance(15)
        directory.refresh()
        assert not directory.last_full
    api.recorder.queries.clear()

    clock.advance(15)  # 300 s after the first listing started
    users = directory.refresh()

    assert directory.last_full
    assert directory.last_rows == len(users)
    assert len(users) == len(api.truth())
    assert all("updated_since" not in query for query in api.recorder.queries)
    clock.advance(15)
    directory.refresh()
    assert not directory.last_full


def test_clock_back_forces_full_listing(api: AdminApi) -> None:
    clock = FakeClock()
    directory = api.directory(clock)
    directory.refresh()
    clock.advance(-30)

    directory.refresh()

    assert directory.last_full


def test_failed_poll_keeps_state(api: AdminApi) -> None:
    clock = FakeClock()
    directory = api.directory(clock, page_size=1)
    before = directory.refresh()
    first_start = clock.now
    api.change("POST", "/users/bulk_020/disable")
    api.change("POST", "/users/bulk_021/disable")
    api.recorder.queries.clear()
    api.recorder.fail_after = 1  # the first page of changes succeeds, the second fails

    clock.advance(15)
    with pytest.raises(RegsandboxError) as failure:
        directory.refresh()

    assert failure.value.code == "ADMIN_API_REQUEST_FAILED"
    assert len(api.recorder.queries) == 2
    assert directory._users == before  # bulk_020 of the first page was not merged
    assert directory.last_rows == len(before)

    clock.advance(15)
    users = directory.refresh()

    # The poll after the failure still counts from the start of the last successful one.
    assert api.recorder.queries[-1]["updated_since"] == format_updated_since(first_start - timedelta(seconds=120))
    assert users["bulk_020"]["is_active"] is False
    assert users["bulk_021"]["is_active"] is False
    assert users == api.truth()


def test_failed_first_listing_raises(api: AdminApi) -> None:
    directory = UserDirectory("http://127.0.0.1:9", api.service_token, SERVICE, clock=FakeClock(), timeout=2)

    with pytest.raises(RegsandboxError) as unreachable:
        directory.refresh()
    assert unreachable.value.code == "ADMIN_API_UNAVAILABLE"

    directory.admin_api_url = api.url
    assert directory.refresh() == api.truth()
    assert directory.last_full


def test_empty_full_listing_repeats(api: AdminApi) -> None:
    clock = FakeClock()
    directory = api.directory(clock)
    api.recorder.empty = True

    assert directory.refresh() == {}
    api.recorder.empty = False
    clock.advance(15)
    users = directory.refresh()

    assert directory.last_full
    assert users == api.truth()


def test_overlap_absorbs_clock_skew(api: AdminApi) -> None:
    """The sync host's clock runs 60 s ahead of admin_api's: without overlap a change is missed."""
    ahead = datetime.now(UTC) + timedelta(seconds=60)
    exact_clock, overlap_clock = FakeClock(ahead), FakeClock(ahead)
    exact = api.directory(exact_clock, overlap=0)
    overlapping = api.directory(overlap_clock, overlap=120)
    exact.refresh()
    overlapping.refresh()
    api.recorder.queries.clear()

    api.change("POST", "/users/bulk_025/disable")
    exact_clock.advance(15)
    overlap_clock.advance(15)
    missed = exact.refresh()
    seen = overlapping.refresh()

    assert [query["updated_since"] for query in api.recorder.queries] == [
        format_updated_since(ahead), format_updated_since(ahead - timedelta(seconds=120))
    ]
    assert missed["bulk_025"]["is_active"] is True
    assert seen["bulk_025"]["is_active"] is False


def test_format_updated_since() -> None:
    beijing = datetime(2026, 12, 5, 16, 0, 0, 123456, tzinfo=ZoneInfo("Asia/Shanghai"))

    assert format_updated_since(beijing) == "2026-12-05T08:00:00.123456Z"
    with pytest.raises(ValueError):
        format_updated_since(datetime(2026, 12, 5, 8, 0))
