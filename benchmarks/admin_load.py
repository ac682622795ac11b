"""Load benchmark of admin_api (identity, institutions, audit log) with a real JupyterHub beside it.

Run from the repository root:

    .venv/bin/python benchmarks/admin_load.py            # SQLite, then PostgreSQL; 60 s of load each
    .venv/bin/python benchmarks/admin_load.py --quick    # smoke run: 20 s, 50 users, less data

For each backend the script creates a data directory under /tmp, and for PostgreSQL a database
with a random name on 127.0.0.1:5432 as user ``postgres``. It initialises them as
``regsandbox init`` does (data directory, platform secrets, ``admin_api.manage migrate`` and
``seed-demo``, key store) and adds the bulk data of benchmarks/load_seed.py. Then it starts
admin_api and JupyterHub with the commands, arguments and environment that ``regsandbox up``
uses (``launcher.cli._process_specs``), on free ports of 127.0.0.1.

The phases (benchmarks/load_client.py): the virtual users sign in, a few at a time; then for a
steady window they call with think time while more users sign in one by one and two probes
sample ``GET /healthz`` (the baseline) and JupyterHub's ``GET /hub/api/users``; then a
saturation phase runs a fixed number of loops without think time, first with the same mix of
calls, then with ``GET /healthz`` only; last, each call is sent alone to measure it unloaded.
Everything started is stopped and deleted at the end, and the database is dropped. The results
replace the ``admin_load`` section of docs/benchmarks.md unless --no-write is given; --save
keeps the measurements so that --render can rewrite the report without measuring again.

Exit status 0 when the run completed (whether or not the targets were met), 1 when the platform
could not be initialised or a server did not start; the message names the log to read.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import pickle
import random
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
from sqlalchemy import func, select

from launcher.cli import PYTHON, LaunchError, _process_specs, _run_step, prepare_data_dir
from launcher.processes import ProcessGroup
from admin_api.db import make_engine, make_session_factory
from admin_api.models import Institution, User
from admin_api.security import hash_password, verify_password
from hub_config.hubfiles import hub_service_api_token
from regsandbox_core.platform_keys import ensure_platform_keys, open_keystore
from regsandbox_core.secrets import ensure_platform_secrets
from regsandbox_core.settings import PROJECT_ROOT, Settings

from load_client import HEALTH, HUB_USERS, Call, Catalogue, Recorder, VirtualUser, probe, saturate, sign_in_all, \
    sign_in_stream, think_time_load, timed_request, unloaded_calls
from load_seed import SeedSummary, pick_sign_in_users, prepare_sign_in_users, seed_audit_events, seed_institutions, \
    seed_messages, seed_users
from report_admin_load import render_report
from report_page import REPORT_PATH, write_section

POSTGRES_ADMIN_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
DEMO_INSTITUTIONS = ["bank_a", "bank_b", "bank_c"]
UNIX_PREFIX = "rst-"
"""Prefix of Unix users and groups the hub would create; this benchmark spawns no server, so it creates none."""
TARGET_P95_MS = 100.0
SIGN_IN_TARGET_P95_MS = 500.0
REPORT_SECTION = "admin_load"
WARMUP_CONCURRENCY = 4
"""Virtual users signing in at once before the load; more only queue at admin_api's password gate."""
PROCESS_NAMES = ("admin_api", "hub")
SIGN_IN_MIX = {"system_admin": 30, "regulator_reviewer": 20, "security_admin": 5, "audit_admin": 5,
               "modeller": 70, "reporter": 70}
"""Roles of the 200 virtual users of a full run; --quick and --users scale it."""


@dataclass(frozen=True)
class Options:
    backends: tuple[str, ...]
    institutions: int
    users: int
    audit_events: int
    virtual_users: int
    duration: float
    sign_in_interval: float
    warmup_concurrency: int
    admin_workers: int
    think: tuple[float, float]
    saturation_workers: int
    saturation_seconds: float
    hub_logins: int
    probe_interval: float
    unloaded_rounds: int
    seed: int
    command: str
    profile_dir: Path | None = None


@dataclass
class CpuTimes:
    """CPU seconds used so far by the processes of interest, and the machine's busy and total ticks."""

    admin_api: float
    hub: float
    database: dict[int, float]
    """CPU seconds of each PostgreSQL backend process of the benchmark's database, by pid."""
    client: float
    machine_busy: int
    machine_total: int
    at: float = field(default_factory=time.perf_counter)


@dataclass
class BackendRun:
    backend: str
    database_version: str
    summary: SeedSummary
    users_by_role: dict[str, int]
    institutions: int
    recorder: Recorder
    steady: tuple[float, float]
    warmup_seconds: float
    saturation_seconds: float
    saturation_health_seconds: float
    hub_user_count: int
    argon2_verify_ms: float
    cpu: dict[str, tuple[CpuTimes, CpuTimes]]
    unloaded_cpu: dict[str, float]
    """admin_api CPU seconds per request of each call kind, sent one at a time after the load."""
    seed_seconds: float
    load_average: tuple[float, float, float]


# --- processes and CPU accounting ------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return probe_socket.getsockname()[1]


def _proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _database_backends(database: str | None) -> list[int]:
    """Return the PostgreSQL backend processes serving ``database`` (their title names it)."""
    if not database:
        return []
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title.startswith("postgres:") and f" {database} " in title:
                pids.append(int(entry.name))
    return pids


def _machine_ticks() -> tuple[int, int]:
    values = [int(value) for value in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def cpu_snapshot(pids: dict[str, int], database: str | None) -> CpuTimes:
    hub_pids = [pids["hub"], *_children(pids["hub"])] if "hub" in pids else []
    # With --workers, uvicorn's worker processes are children of the supervisor started by the launcher.
    admin_pids = [pids["admin_api"], *_children(pids["admin_api"])]
    busy, total = _machine_ticks()
    return CpuTimes(
        admin_api=sum(_proc_cpu_seconds(pid) for pid in admin_pids),
        hub=sum(_proc_cpu_seconds(pid) for pid in hub_pids),
        database={pid: _proc_cpu_seconds(pid) for pid in _database_backends(database)},
        client=time.process_time(),
        machine_busy=busy,
        machine_total=total,
    )


# --- initialisation ----------------------------------------------------------------------------------


def platform_environment(data_dir: Path, database_url: str | None) -> dict[str, str]:
    """Return the REGSANDBOX_* variables of one run: its data directory, database and free ports."""
    env = {
        "REGSANDBOX_DATA_DIR": str(data_dir),
        "REGSANDBOX_UNIX_PREFIX": UNIX_PREFIX,
        "REGSANDBOX_SANDBOX_HOME_ROOT": str(data_dir / "homes"),
        "REGSANDBOX_SMTP_SINK": "false",
    }
    for name in ("ADMIN_API", "HUB", "HUB_API", "PROXY_API", "MLFLOW", "SMTP"):
        env[f"REGSANDBOX_{name}_PORT"] = str(free_port())
    if database_url:
        env["REGSANDBOX_DATABASE_URL"] = database_url
    return env


def use_environment(env: dict[str, str]) -> Settings:
    """Replace every REGSANDBOX_* variable of this process with ``env`` and return the settings they give.

    The launcher passes this process's environment to the servers it starts, so they see the same.
    """
    for name in [name for name in os.environ if name.startswith("REGSANDBOX_")]:
        del os.environ[name]
    os.environ.update(env)
    return Settings()


def initialise(settings: Settings) -> None:
    """Initialise the data directory as ``regsandbox init`` does, without the demo credit data and extracts."""
    prepare_data_dir(settings)
    ensure_platform_secrets(settings)
    _run_step(settings, "数据库迁移", [PYTHON, "-m", "admin_api.manage", "migrate"])
    _run_step(settings, "加载示范机构与用户", [PYTHON, "-m", "admin_api.manage", "seed-demo"])
    # `init` takes the institution codes from the demo credit data in the warehouse, which this
    # benchmark does not load; the demo banks' codes give the same key store.
    ensure_platform_keys(settings, DEMO_INSTITUTIONS, on_event=None)


def arriving_count(options: Options) -> int:
    """Return how many users sign in during the steady window, one every ``sign_in_interval`` seconds."""
    return max(1, int(options.duration / options.sign_in_interval))


def scaled_mix(virtual_users: int) -> dict[str, int]:
    """Return SIGN_IN_MIX scaled to ``virtual_users``, at least one user per role."""
    total = sum(SIGN_IN_MIX.values())
    mix = {role: max(1, round(count * virtual_users / total)) for role, count in SIGN_IN_MIX.items()}
    mix["reporter"] += virtual_users - sum(mix.values())
    return mix


def seed(settings: Settings, options: Options, rng: random.Random,
         credentials: dict[str, tuple[str, str]]) -> tuple[SeedSummary, dict[str, int], int]:
    """Add the bulk data; return the summary, users per role and the number of institutions now stored.

    ``credentials`` caches the passwords and hashes of the signing-in users across backends.
    """
    started = time.perf_counter()
    summary = SeedSummary()
    engine = make_engine(settings.sqlalchemy_url)
    session_factory = make_session_factory(engine)
    try:
        with session_factory() as session:
            ids = seed_institutions(session, options.institutions, rng, summary)
            seed_users(session, settings, options.users, ids, rng, summary)
            session.commit()
            chosen = pick_sign_in_users(summary, scaled_mix(options.virtual_users), rng)
            arriving = pick_sign_in_users(summary, scaled_mix(arriving_count(options)), rng,
                                          exclude=frozenset(name for name, _ in chosen))
            prepared = prepare_sign_in_users(session, settings, open_keystore(settings), chosen + arriving, summary,
                                             credentials)
            summary.sign_in_users, summary.arriving_users = prepared[:len(chosen)], prepared[len(chosen):]
            summary.messages = seed_messages(session, summary.sign_in_users)
            session.commit()
        summary.audit_events = seed_audit_events(session_factory, options.audit_events, summary.role_by_username, rng)
        with session_factory() as session:
            users_by_role = dict(session.execute(select(User.role, func.count()).group_by(User.role)).all())
            institutions = session.scalar(select(func.count()).select_from(Institution)) or 0
            summary.institution_codes = sorted(session.scalars(select(Institution.code)))
        if engine.dialect.name == "postgresql":
            # A database in service has planner statistics: autovacuum analyses a table after bulk
            # changes, within about a minute. Without them PostgreSQL planned the audit log filters
            # for 74 rows instead of 66,000 and took 22 ms instead of 0.2 ms, and an analyse started
            # by autovacuum during the load would be measured as part of it.
            with engine.connect() as connection:
                connection.exec_driver_sql("ANALYZE")
                connection.commit()
    finally:
        engine.dispose()
    summary.seconds = time.perf_counter() - started
    return summary, users_by_role, institutions


def start_servers(settings: Settings, group: ProcessGroup, profile_output: Path | None, workers: int) -> dict[str, int]:
    """Start admin_api and JupyterHub exactly as ``regsandbox up`` does; return their pids.

    With ``workers`` above 1, uvicorn gets ``--workers``. With ``profile_output``, admin_api runs the same
    uvicorn arguments under benchmarks/profile_server.py, which writes its profile there when the
    server stops. Raises LaunchError with the end of the failing server's log.
    """
    pids = {}
    for spec in _process_specs(settings):
        if spec.name not in PROCESS_NAMES:
            continue
        if spec.name == "admin_api" and workers > 1:
            spec.argv = [*spec.argv, "--workers", str(workers)]
        if spec.name == "admin_api" and profile_output is not None:
            spec.argv = [PYTHON, str(Path(__file__).with_name("profile_server.py")), str(profile_output), *spec.argv[1:]]
        print(f"starting {spec.name}: {' '.join(spec.argv)}", file=sys.stderr, flush=True)
        try:
            pids[spec.name] = group.start(spec).pid
        except RuntimeError as error:
            log_path = settings.logs_dir / f"{spec.name}.log"
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else "(no log)"
            raise LaunchError(f"{spec.description}（{spec.name}）未能启动：{error}\n{log_path} 末尾：\n{tail}") from error
    return pids


def hub_login(settings: Settings, username: str, password: str) -> None:
    """Sign in at the hub's login form as a browser does, without following the redirect to the spawn page."""
    with httpx.Client(base_url=settings.hub_url, timeout=60, trust_env=False) as client:
        client.get("/hub/login")
        response = client.post("/hub/login", data={"username": username, "password": password,
                                                   "_xsrf": client.cookies.get("_xsrf", "")})
    if response.status_code != 302:
        raise LaunchError(f"JupyterHub 登录 {username} 失败：HTTP {response.status_code}，{response.text[:300]}")


def measure_argon2_verify(rounds: int = 5) -> float:
    """Return the median milliseconds of one argon2id verification in this process, the sign-in baseline."""
    password = secrets.token_urlsafe(16)
    stored = hash_password(password)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        verify_password(stored, password)
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)[rounds // 2]


# --- the load ----------------------------------------------------------------------------------------


async def run_load(settings: Settings, options: Options, summary: SeedSummary, pids: dict[str, int],
                   database: str | None, rng: random.Random) -> tuple[Recorder, tuple[float, float], float, float,
                                                                      float, dict[str, tuple[CpuTimes, CpuTimes]],
                                                                      dict[str, float]]:
    """Run the phases against running servers: warm-up sign-ins, steady load with probes, saturation, unloaded calls."""
    recorder = Recorder()
    catalogue = Catalogue(
        institution_codes=summary.institution_codes,
        institution_usernames=sorted(name for names in summary.usernames_by_institution.values() for name in names),
        actors=sorted(summary.role_by_username),
    )
    users = [VirtualUser(account, catalogue, random.Random(rng.random())) for account in summary.sign_in_users]
    for user in users:
        user.open(settings.admin_api_url)
    health = httpx.AsyncClient(base_url=settings.admin_api_url, timeout=30, trust_env=False)
    hub = httpx.AsyncClient(base_url=settings.hub_url, timeout=30, trust_env=False,
                            headers={"Authorization": f"token {hub_token(settings)}"})
    cpu: dict[str, tuple[CpuTimes, CpuTimes]] = {}
    arriving = [VirtualUser(account, catalogue, random.Random(rng.random())) for account in summary.arriving_users]
    for user in arriving:
        user.open(settings.admin_api_url)
    try:
        warmup_seconds = await sign_in_all(users, recorder, options.warmup_concurrency)
        until = time.perf_counter() + options.duration
        before = cpu_snapshot(pids, database)
        window_start = time.perf_counter() - recorder.origin
        await asyncio.gather(
            think_time_load(users, recorder, until, options.think),
            sign_in_stream(arriving, recorder, options.sign_in_interval, until),
            probe(health, recorder, Call(HEALTH, "GET", "/healthz"), options.probe_interval, until),
            probe(hub, recorder, Call(HUB_USERS, "GET", "/hub/api/users"), options.probe_interval, until),
        )
        cpu["steady"] = (before, cpu_snapshot(pids, database))
        window = (window_start, time.perf_counter() - recorder.origin)

        # Saturation: one loop per virtual user, picked evenly across the list (and so across roles).
        signed_in = [user for user in users if user.signed_in]
        step = max(1, len(signed_in) // options.saturation_workers)
        workers = signed_in[::step][:options.saturation_workers]
        before = cpu_snapshot(pids, database)
        saturation_seconds = await saturate(
            [functools.partial(user.run_call, recorder, "saturation") for user in workers], options.saturation_seconds)
        cpu["saturation"] = (before, cpu_snapshot(pids, database))

        health_clients = [httpx.AsyncClient(base_url=settings.admin_api_url, timeout=30, trust_env=False)
                          for _ in workers]
        try:
            before = cpu_snapshot(pids, database)
            health_seconds = await saturate(
                [functools.partial(timed_request, client, recorder, "saturation_health", Call(HEALTH, "GET", "/healthz"))
                 for client in health_clients], options.saturation_seconds / 2)
            cpu["saturation_health"] = (before, cpu_snapshot(pids, database))
        finally:
            for client in health_clients:
                await client.aclose()

        unloaded_cpu = await unloaded_calls(users, recorder, options.unloaded_rounds,
                                            lambda: cpu_snapshot(pids, None).admin_api)
        for _ in range(options.unloaded_rounds):
            await timed_request(health, recorder, "unloaded", Call(HEALTH, "GET", "/healthz"))
    finally:
        for user in users + arriving:
            await user.close()
        await health.aclose()
        await hub.aclose()
    return recorder, window, warmup_seconds, saturation_seconds, health_seconds, cpu, unloaded_cpu


def hub_token(settings: Settings) -> str:
    from regsandbox_core.secrets import load_platform_secrets

    return hub_service_api_token(load_platform_secrets(settings))


# --- one backend -------------------------------------------------------------------------------------


def create_database() -> tuple[str, str]:
    name = f"rs_bench_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(POSTGRES_ADMIN_DSN, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def database_version(backend: str) -> str:
    if backend == "sqlite":
        return f"SQLite {sqlite3.sqlite_version}"
    with psycopg.connect(POSTGRES_ADMIN_DSN) as connection:
        return "PostgreSQL " + connection.execute("SHOW server_version").fetchone()[0].split()[0]


def run_backend(backend: str, options: Options, credentials: dict[str, tuple[str, str]]) -> BackendRun:
    rng = random.Random(options.seed)
    data_dir = Path(tempfile.mkdtemp(prefix=f"regsandbox-admin-load-{backend}-", dir="/tmp"))
    database = None
    group: ProcessGroup | None = None
    settings: Settings | None = None
    saved_environment = dict(os.environ)
    try:
        url = None
        if backend == "postgresql":
            database, url = create_database()
        settings = use_environment(platform_environment(data_dir, url))
        print(f"[{backend}] initialising {data_dir}", file=sys.stderr, flush=True)
        initialise(settings)
        summary, users_by_role, institutions = seed(settings, options, rng, credentials)
        print(f"[{backend}] seeded {institutions} institutions, {sum(users_by_role.values())} users, "
              f"{summary.audit_events} audit events in {summary.seconds:.0f} s", file=sys.stderr, flush=True)

        group = ProcessGroup(settings.run_dir, settings.logs_dir)
        profile_output = options.profile_dir / f"admin_api-{backend}.txt" if options.profile_dir else None
        pids = start_servers(settings, group, profile_output, options.admin_workers)
        modellers = [user for user in summary.sign_in_users if user.role == "modeller"][:options.hub_logins]
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda user: hub_login(settings, user.username, user.password), modellers))
        with httpx.Client(base_url=settings.hub_url, trust_env=False, timeout=30,
                          headers={"Authorization": f"token {hub_token(settings)}"}) as client:
            hub_user_count = len(client.get("/hub/api/users").raise_for_status().json())
        argon2_ms = measure_argon2_verify()

        print(f"[{backend}] load: {len(summary.sign_in_users)} users sign in, then {options.duration:.0f} s "
              "of steady load, then saturation", file=sys.stderr, flush=True)
        recorder, window, warmup_seconds, saturation_seconds, health_seconds, cpu, unloaded_cpu = asyncio.run(
            run_load(settings, options, summary, pids, database, rng))
        for kind, examples in recorder.error_examples.items():
            print(f"[{backend}] errors of {kind}: {examples}", file=sys.stderr)
        return BackendRun(
            backend=backend, database_version=database_version(backend), summary=summary,
            users_by_role=users_by_role, institutions=institutions, recorder=recorder, steady=window,
            warmup_seconds=warmup_seconds,
            saturation_seconds=saturation_seconds, saturation_health_seconds=health_seconds,
            hub_user_count=hub_user_count, argon2_verify_ms=argon2_ms, cpu=cpu, unloaded_cpu=unloaded_cpu,
            seed_seconds=summary.seconds,
            load_average=os.getloadavg(),
        )
    finally:
        if group is not None:
            group.stop_all()
        if options.profile_dir:
            for log_file in settings.logs_dir.glob("*.log") if settings else []:
                shutil.copy(log_file, options.profile_dir / f"{log_file.stem}-{backend}.log")
        os.environ.clear()
        os.environ.update(saved_environment)
        if database:
            drop_database(database)
        shutil.rmtree(data_dir, ignore_errors=True)


# --- command line ------------------------------------------------------------------------------------


def parse_options(argv: list[str] | None = None) -> tuple[Options, bool]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="sqlite,postgresql",
                        help="comma-separated backends to run, of sqlite and postgresql (default both)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 50 virtual users, 20 s steady load, 10 s saturation, 2,000 users")
    parser.add_argument("--duration", type=float, help="seconds of steady load (default 60)")
    parser.add_argument("--sign-in-interval", type=float, default=1.0,
                        help="seconds between two sign-ins of arriving users during the steady load (default 1)")
    parser.add_argument("--admin-workers", type=int, default=1,
                        help="uvicorn worker processes of admin_api (default 1, as `regsandbox up` starts it)")
    parser.add_argument("--users", type=int, help="virtual users (default 200)")
    parser.add_argument("--saturation-workers", type=int, default=32,
                        help="concurrent loops without think time in the saturation phase (default 32)")
    parser.add_argument("--saturation-seconds", type=float, help="seconds of the saturation phase (default 20)")
    parser.add_argument("--seed", type=int, default=20261205, help="random seed of the data and the call mix")
    parser.add_argument("--profile-dir", type=Path,
                        help="run admin_api under benchmarks/profile_server.py and write its profile into this folder")
    parser.add_argument("--no-write", action="store_true", help="print the report instead of writing docs/benchmarks.md")
    parser.add_argument("--save", type=Path, help="also store the measurements in this file (pickle), for --render")
    parser.add_argument("--render", type=Path,
                        help="measure nothing: rewrite the report from measurements stored with --save")
    arguments = parser.parse_args(argv)

    backends = tuple(name.strip() for name in arguments.backends.split(",") if name.strip())
    unknown = [name for name in backends if name not in ("sqlite", "postgresql")]
    if unknown or not backends:
        parser.error(f"--backends: unknown backend {', '.join(unknown) or '(none)'}; use sqlite and/or postgresql")
    quick = arguments.quick
    options = Options(
        backends=backends,
        institutions=200 if quick else 1000,
        users=2000 if quick else 20000,
        audit_events=10_000 if quick else 100_000,
        virtual_users=arguments.users or (50 if quick else 200),
        sign_in_interval=arguments.sign_in_interval,
        warmup_concurrency=WARMUP_CONCURRENCY,
        admin_workers=arguments.admin_workers,
        duration=arguments.duration or (20.0 if quick else 60.0),
        think=(0.5, 2.0),
        saturation_workers=arguments.saturation_workers,
        saturation_seconds=arguments.saturation_seconds or (10.0 if quick else 20.0),
        hub_logins=10 if quick else 20,
        probe_interval=0.5,
        unloaded_rounds=30,
        seed=arguments.seed,
        command=".venv/bin/python benchmarks/admin_load.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        profile_dir=arguments.profile_dir.resolve() if arguments.profile_dir else None,
    )
    if options.profile_dir:
        options.profile_dir.mkdir(parents=True, exist_ok=True)
    return options, arguments.no_write, arguments.save, arguments.render


def measure(options: Options) -> tuple[list[BackendRun], tuple[float, float, float], str] | None:
    """Run every backend; return the runs, the load average before them and the date, or None after an error."""
    if Path(sys.executable).parent != PROJECT_ROOT / ".venv" / "bin":
        print(f"warning: running with {sys.executable}; the servers start with {PYTHON}", file=sys.stderr)
    load_before = os.getloadavg()
    runs = []
    credentials: dict[str, tuple[str, str]] = {}
    try:
        for backend in options.backends:
            runs.append(run_backend(backend, options, credentials))
    except LaunchError as error:
        print(f"基准测试无法进行：{error}", file=sys.stderr)
        return None
    except psycopg.OperationalError as error:
        print(f"无法连接 127.0.0.1:5432 上的 PostgreSQL（用户 postgres）：{error}。请启动数据库，或用 --backends sqlite 只测 SQLite。",
              file=sys.stderr)
        return None
    return runs, load_before, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def main(argv: list[str] | None = None) -> int:
    options, no_write, save_path, render_path = parse_options(argv)
    if render_path:
        with open(render_path, "rb") as stored:
            options, runs, load_before, date = pickle.load(stored)  # a file this script wrote with --save
    else:
        measured = measure(options)
        if measured is None:
            return 1
        runs, load_before, date = measured
        if save_path:
            with open(save_path, "wb") as stored:
                pickle.dump((options, runs, load_before, date), stored)
    report = render_report(options, runs, load_before, date, TARGET_P95_MS, SIGN_IN_TARGET_P95_MS)
    print(report)
    if not no_write:
        write_section(REPORT_SECTION, report, REPORT_PATH)
        print(f"written to the {REPORT_SECTION} section of {REPORT_PATH}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
