"""Virtual users of the admin_api load benchmark: what each role calls, and the latency recorder.

Each virtual user has its own ``httpx.AsyncClient`` (one keep-alive connection, like one browser),
signs in once with ``POST /api/v1/auth/token`` and then repeats calls drawn from its role's mix.
Every request goes to 127.0.0.1 and every loop ends at a deadline.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pyotp

from load_seed import NAME_PREFIXES, SURNAMES, SignInUser

REQUEST_TIMEOUT_SECONDS = 30.0
SIGN_IN = "POST /auth/token (sign-in)"
HEALTH = "GET /healthz (baseline)"
HUB_USERS = "GET /hub/api/users (JupyterHub)"


@dataclass(frozen=True)
class Call:
    """One request of the mix: its kind (the label the report groups by) and what to send."""

    kind: str
    method: str
    path: str
    params: dict[str, Any] | None = None
    json: dict[str, Any] | None = None


@dataclass
class Sample:
    kind: str
    phase: str
    started: float
    """Seconds since the recorder's start."""
    latency: float
    """Seconds from sending the request to reading the whole response."""
    status: int
    """HTTP status, or 0 when no response arrived (connection error or timeout)."""
    ok: bool


@dataclass
class Recorder:
    """All samples of one backend's run, and the first few error responses of each kind for the log."""

    origin: float = field(default_factory=time.perf_counter)
    samples: list[Sample] = field(default_factory=list)
    error_examples: dict[str, list[str]] = field(default_factory=dict)
    notes: Counter[str] = field(default_factory=Counter)

    def add(self, kind: str, phase: str, started: float, latency: float, status: int, ok: bool, detail: str = "") -> None:
        self.samples.append(Sample(kind, phase, started - self.origin, latency, status, ok))
        if not ok:
            examples = self.error_examples.setdefault(kind, [])
            if len(examples) < 3:
                examples.append(f"HTTP {status}: {detail[:300]}")

    def of(self, phase: str, kind: str | None = None) -> list[Sample]:
        return [s for s in self.samples if s.phase == phase and (kind is None or s.kind == kind)]


def percentile(values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of ``values`` (``fraction`` 0.95 for p95); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


async def timed_request(client: httpx.AsyncClient, recorder: Recorder, phase: str, call: Call,
                        expected: int = 200) -> httpx.Response | None:
    """Send ``call``, record its latency and outcome, and return the response (None on a transport error)."""
    started = time.perf_counter()
    try:
        response = await client.request(call.method, call.path, params=call.params, json=call.json)
    except httpx.HTTPError as error:
        recorder.add(call.kind, phase, started, time.perf_counter() - started, 0, False, repr(error))
        return None
    latency = time.perf_counter() - started
    ok = response.status_code == expected
    recorder.add(call.kind, phase, started, latency, response.status_code, ok, "" if ok else response.text)
    return response


@dataclass
class Catalogue:
    """Values the calls pick from: institution codes, user names and search words of the seeded data."""

    institution_codes: list[str]
    institution_usernames: list[str]
    actors: list[str]


class VirtualUser:
    """One signed-in person: picks the next call from the mix of its role."""

    def __init__(self, account: SignInUser, catalogue: Catalogue, rng: random.Random) -> None:
        self.account = account
        self.catalogue = catalogue
        self.rng = rng
        self.unread_ids: list[int] = []
        self.client: httpx.AsyncClient | None = None
        self.mix = ROLE_MIXES.get(account.role, ROLE_MIXES["reporter"])

    def open(self, base_url: str) -> None:
        # trust_env=False: never route through a proxy from the environment, only to 127.0.0.1.
        self.client = httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_SECONDS, trust_env=False,
                                        limits=httpx.Limits(max_connections=1))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    async def sign_in(self, recorder: Recorder, phase: str) -> bool:
        body = {"username": self.account.username, "password": self.account.password}
        if self.account.totp_secret:
            body["totp"] = pyotp.TOTP(self.account.totp_secret).now()
        assert self.client is not None
        response = await timed_request(self.client, recorder, phase, Call(SIGN_IN, "POST", "/api/v1/auth/token", json=body))
        if response is None or response.status_code != 200:
            return False
        self.client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"
        return True

    @property
    def signed_in(self) -> bool:
        return self.client is not None and "Authorization" in self.client.headers

    def next_call(self) -> Call:
        builders, weights = self.mix
        return self.rng.choices(builders, weights)[0](self)

    async def run_call(self, recorder: Recorder, phase: str) -> None:
        await self.send(self.next_call(), recorder, phase)

    async def run_call_of(self, builder: Callable[[VirtualUser], Call], recorder: Recorder, phase: str) -> None:
        await self.send(builder(self), recorder, phase)

    async def send(self, call: Call, recorder: Recorder, phase: str) -> None:
        assert self.client is not None
        response = await timed_request(self.client, recorder, phase, call)
        if response is None or response.status_code != 200:
            return
        if call.kind.startswith("GET /messages"):
            self.unread_ids = [item["id"] for item in response.json()["items"] if item["read_at"] is None]
        elif call.kind.startswith("GET /users?") and "x-total-count" not in response.headers:
            recorder.notes["users list without X-Total-Count"] += 1


# --- the calls of each role -------------------------------------------------------------------------


def _me(user: VirtualUser) -> Call:
    return Call("GET /me (read)", "GET", "/api/v1/me")


def _messages(user: VirtualUser) -> Call:
    return Call("GET /messages (list)", "GET", "/api/v1/messages", params={"limit": 20})


def _unread_messages(user: VirtualUser) -> Call:
    return Call("GET /messages?unread_only (list)", "GET", "/api/v1/messages", params={"unread_only": "true", "limit": 20})


def _mark_read(user: VirtualUser) -> Call:
    if not user.unread_ids:
        return _unread_messages(user)
    message_id = user.unread_ids.pop(user.rng.randrange(len(user.unread_ids)))
    return Call("POST /messages/{id}/read (update)", "POST", f"/api/v1/messages/{message_id}/read")


def _own_institution(user: VirtualUser) -> Call:
    return Call("GET /institutions/{code} (read)", "GET", f"/api/v1/institutions/{user.account.institution_code}")


def _institutions_own_list(user: VirtualUser) -> Call:
    return Call("GET /institutions (list page)", "GET", "/api/v1/institutions", params={"limit": 20})


def _any_institution(user: VirtualUser) -> Call:
    code = user.rng.choice(user.catalogue.institution_codes)
    return Call("GET /institutions/{code} (read)", "GET", f"/api/v1/institutions/{code}")


def _institution_search(user: VirtualUser) -> Call:
    rng = user.rng
    word = rng.choice([rng.choice(NAME_PREFIXES), f"{rng.randrange(1000):04d}"[:rng.choice((2, 3))], "银行", "分行"])
    return Call("GET /institutions?q= (search)", "GET", "/api/v1/institutions", params={"q": word, "limit": 20})


def _institution_page(user: VirtualUser) -> Call:
    offset = user.rng.randrange(10) * 100
    return Call("GET /institutions (list page)", "GET", "/api/v1/institutions", params={"limit": 100, "offset": offset})


def _institution_update(user: VirtualUser) -> Call:
    code = user.rng.choice(user.catalogue.institution_codes)
    phone = f"021-{user.rng.randrange(50000000, 69999999)}"
    return Call("PATCH /institutions/{code} (update)", "PATCH", f"/api/v1/institutions/{code}",
                json={"contact_phone": phone})


def _user_search(user: VirtualUser) -> Call:
    rng = user.rng
    word = rng.choice([rng.choice(SURNAMES), f"mod_{rng.randrange(1000):04d}"[:rng.choice((6, 7))],
                       f"rep_{rng.randrange(1000):04d}"])
    return Call("GET /users?q= (search)", "GET", "/api/v1/users", params={"q": word, "limit": 50})


def _user_list_by_institution(user: VirtualUser) -> Call:
    code = user.rng.choice(user.catalogue.institution_codes)
    return Call("GET /users?institution_code= (list)", "GET", "/api/v1/users",
                params={"institution_code": code, "limit": 100})


def _user_read(user: VirtualUser) -> Call:
    name = user.rng.choice(user.catalogue.institution_usernames)
    return Call("GET /users/{username} (read)", "GET", f"/api/v1/users/{name}")


def _user_update(user: VirtualUser) -> Call:
    name = user.rng.choice(user.catalogue.institution_usernames)
    display_name = user.rng.choice(SURNAMES) + user.rng.choice(SURNAMES) + "（基准测试）"
    return Call("PATCH /users/{username} (update)", "PATCH", f"/api/v1/users/{name}", json={"display_name": display_name})


def _keys(user: VirtualUser) -> Call:
    return Call("GET /keys (list)", "GET", "/api/v1/keys")


def _audit_page(user: VirtualUser) -> Call:
    return Call("GET /audit/events (list)", "GET", "/api/v1/audit/events", params={"limit": 50})


def _audit_search(user: VirtualUser) -> Call:
    rng = user.rng
    params: dict[str, Any] = {"limit": 50}
    choice = rng.randrange(3)
    if choice == 0:
        params["actor"] = rng.choice(user.catalogue.actors)
    elif choice == 1:
        params.update(action="auth.token", outcome="failed")
    else:
        params["institution"] = rng.choice(user.catalogue.institution_codes)
    return Call("GET /audit/events?filter (search)", "GET", "/api/v1/audit/events", params=params)


Builder = Callable[[VirtualUser], Call]


def _mix(*pairs: tuple[Builder, int]) -> tuple[list[Builder], list[int]]:
    return [builder for builder, _ in pairs], [weight for _, weight in pairs]


ROLE_MIXES: dict[str, tuple[list[Builder], list[int]]] = {
    "system_admin": _mix(
        (_user_search, 15), (_user_list_by_institution, 10), (_user_read, 10), (_institution_search, 15),
        (_institution_page, 10), (_any_institution, 15), (_institution_update, 8), (_user_update, 7),
        (_me, 5), (_messages, 5),
    ),
    "regulator_reviewer": _mix(
        (_institution_search, 25), (_any_institution, 25), (_institution_page, 15), (_me, 10), (_messages, 15),
        (_mark_read, 10),
    ),
    "security_admin": _mix((_keys, 30), (_me, 20), (_messages, 30), (_institution_search, 20)),
    "audit_admin": _mix((_audit_page, 30), (_audit_search, 30), (_me, 10), (_messages, 20), (_mark_read, 10)),
    "modeller": _mix(
        (_me, 25), (_messages, 25), (_unread_messages, 10), (_own_institution, 20), (_institutions_own_list, 10),
        (_mark_read, 10),
    ),
    "reporter": _mix(
        (_me, 25), (_messages, 25), (_unread_messages, 10), (_own_institution, 20), (_institutions_own_list, 10),
        (_mark_read, 10),
    ),
}
"""Weights of each role's calls. Institution users (and roles without a mix of their own) read their
own record, their inbox and their institution; administrators search, read and edit."""


# --- phases -----------------------------------------------------------------------------------------


async def sign_in_all(users: list[VirtualUser], recorder: Recorder, concurrency: int) -> float:
    """Sign every user in, ``concurrency`` at a time, as phase ``warmup``; return the seconds taken."""
    slots = asyncio.Semaphore(concurrency)
    started = time.perf_counter()

    async def one_user(user: VirtualUser) -> None:
        async with slots:
            await user.sign_in(recorder, "warmup")

    await asyncio.gather(*(one_user(user) for user in users))
    return time.perf_counter() - started


async def think_time_load(users: list[VirtualUser], recorder: Recorder, until: float,
                          think: tuple[float, float]) -> None:
    """Let every signed-in user call with think time until ``until`` (perf_counter time), as phase ``steady``.

    Each user first waits one think time, so the users' calls start spread out as they would be
    after they signed in one by one.
    """

    async def one_user(user: VirtualUser) -> None:
        while True:
            await asyncio.sleep(user.rng.uniform(*think))
            if time.perf_counter() >= until:
                return
            await user.run_call(recorder, "steady")

    await asyncio.gather(*(one_user(user) for user in users if user.signed_in))


async def sign_in_stream(users: list[VirtualUser], recorder: Recorder, interval: float, until: float) -> None:
    """Sign one more user in every ``interval`` seconds until ``until`` or the users run out, as phase ``steady``.

    These are people arriving while the others work; each sign-in is sent whether or not the
    previous one has finished.
    """
    tasks = []
    for user in users:
        if time.perf_counter() >= until:
            break
        tasks.append(asyncio.create_task(user.sign_in(recorder, "steady")))
        await asyncio.sleep(interval)
    await asyncio.gather(*tasks)


async def probe(client: httpx.AsyncClient, recorder: Recorder, call: Call, interval: float, until: float) -> None:
    """Send ``call`` every ``interval`` seconds until ``until`` (perf_counter time), as phase ``steady``."""
    while time.perf_counter() < until:
        await timed_request(client, recorder, "steady", call)
        await asyncio.sleep(interval)


async def saturate(steps: list[Callable[[], Awaitable[object]]], duration: float) -> float:
    """Run each step in its own loop without think time for ``duration`` seconds; return the seconds taken.

    Every loop awaits its step before the next one, so ``len(steps)`` requests are in flight at most.
    """
    start = time.perf_counter()
    end = start + duration

    async def loop(step: Callable[[], Awaitable[object]]) -> None:
        while time.perf_counter() < end:
            await step()

    await asyncio.gather(*(loop(step) for step in steps))
    return time.perf_counter() - start


async def unloaded_calls(users: list[VirtualUser], recorder: Recorder, rounds: int,
                         cpu_seconds: Callable[[], float]) -> dict[str, float]:
    """Send each call of each role's mix ``rounds`` times, one at a time, as phase ``unloaded``.

    One signed-in user per role sends its calls. Returns the server CPU seconds per request of each
    kind, from ``cpu_seconds`` read before and after each kind's requests.
    """
    cpu: dict[str, list[float]] = {}
    by_role: dict[str, VirtualUser] = {}
    for user in users:
        if user.signed_in:
            by_role.setdefault(user.account.role, user)
    for user in by_role.values():
        builders, _ = user.mix
        for builder in builders:
            first = len(recorder.samples)
            before = cpu_seconds()
            for _ in range(rounds):
                await user.run_call_of(builder, recorder, "unloaded")
            used = cpu_seconds() - before
            # A builder can fall back to another kind (mark read without unread messages); charge the most frequent.
            kind = Counter(sample.kind for sample in recorder.samples[first:]).most_common(1)[0][0]
            cpu.setdefault(kind, []).append(used / rounds)
    return {kind: sum(values) / len(values) for kind, values in cpu.items()}
