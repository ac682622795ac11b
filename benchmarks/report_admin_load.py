"""Markdown of the ``admin_load`` section of docs/benchmarks.md, from the runs of benchmarks/admin_load.py."""

from __future__ import annotations

import math
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from load_client import HEALTH, HUB_USERS, SIGN_IN, Sample, percentile
from load_seed import MESSAGES_PER_SIGNED_IN_USER, UNREAD_MESSAGES_PER_SIGNED_IN_USER
from regsandbox_core.settings import PROJECT_ROOT

if TYPE_CHECKING:
    from admin_load import BackendRun, CpuTimes, Options  # noqa: F401

ROLE_LABELS = {
    "system_admin": "系统管理员", "security_admin": "安全管理员", "audit_admin": "审计管理员",
    "regulator_reviewer": "监管审查员", "regulator_analyst": "监管分析员", "institution_admin": "机构管理员",
    "modeller": "建模人员", "reporter": "报送人员",
}
BACKEND_LABELS = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}


def _ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value * 1000:,.1f}"


def _ratio(value: float, baseline: float) -> str:
    if math.isnan(value) or math.isnan(baseline) or baseline == 0:
        return "—"
    return f"{value / baseline:.2f}×"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _proxy_version() -> str:
    import json

    package = PROJECT_ROOT / "node_modules" / "configurable-http-proxy" / "package.json"
    try:
        return json.loads(package.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory_total() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            return f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    return "unknown"


def _latencies(samples: list[Sample]) -> list[float]:
    return [sample.latency for sample in samples]


def _is_admin_read(kind: str) -> bool:
    return kind.startswith("GET /") and kind not in (HEALTH, HUB_USERS)


def _stats_row(label: str, samples: list[Sample], target: float | None, baseline_p95: float | None,
               unloaded: list[Sample], cpu_seconds: float | None) -> str:
    """Return one table row: counts, percentiles, and p95 against the target, healthz and the unloaded p50."""
    values = _latencies(samples)
    p95 = percentile(values, 0.95)
    errors = sum(1 for sample in samples if not sample.ok)
    target_cell = _ratio(p95, target / 1000) if target else "—"
    baseline_cell = _ratio(p95, baseline_p95) if baseline_p95 is not None else "—"
    unloaded_p50 = percentile(_latencies(unloaded), 0.5)
    cpu_cell = f"{cpu_seconds * 1000:.1f}" if cpu_seconds is not None else "—"
    return (f"| {label} | {len(values):,} | {errors} | {_ms(percentile(values, 0.5))} | {_ms(p95)} | "
            f"{_ms(percentile(values, 0.99))} | {_ms(max(values) if values else math.nan)} | {target_cell} | "
            f"{baseline_cell} | {_ms(unloaded_p50)} | {_ratio(p95, unloaded_p50)} | {cpu_cell} |")


def database_cpu(before: CpuTimes, after: CpuTimes) -> float:
    """Return the CPU seconds PostgreSQL backends used between two snapshots.

    A backend that exited in between (SQLAlchemy closes overflow connections when they return to
    the pool) is missing from ``after``, so its last seconds are not counted: an underestimate.
    """
    return sum(seconds - before.database.get(pid, 0.0) for pid, seconds in after.database.items())


def _cpu_line(before: CpuTimes, after: CpuTimes, requests: int) -> str:
    """Return the CPU cells of one phase: each process in % of one core, the whole machine in % of all cores."""
    seconds = after.at - before.at
    admin = after.admin_api - before.admin_api
    hub = after.hub - before.hub
    database = database_cpu(before, after)
    client = after.client - before.client
    busy_share = (after.machine_busy - before.machine_busy) / max(after.machine_total - before.machine_total, 1)
    other = max(0.0, busy_share * (os.cpu_count() or 1) * seconds - admin - hub - database - client)
    per_request = f"{admin / requests * 1000:.1f} ms" if requests else "—"
    return (f"{admin / seconds:.0%} ({per_request} per request) | {hub / seconds:.0%} | {database / seconds:.0%} | "
            f"{client / seconds:.0%} | {other / seconds:.0%} | {busy_share:.0%} |")


def worst_call(run: BackendRun) -> tuple[str, float]:
    """Return the call kind with the highest steady-state p95 of the think-time mix, and that p95."""
    steady = run.recorder.of("steady")
    kinds = sorted({s.kind for s in steady} - {HEALTH, HUB_USERS, SIGN_IN})
    if not kinds:
        return "—", math.nan
    p95s = {kind: percentile(_latencies([s for s in steady if s.kind == kind]), 0.95) for kind in kinds}
    kind = max(p95s, key=lambda name: p95s[name])
    return kind, p95s[kind]


def summary_figures(run: BackendRun, target_ms: float, sign_in_target_ms: float) -> dict[str, str]:
    recorder = run.recorder
    steady = recorder.of("steady")
    mix = [s for s in steady if s.kind not in (HEALTH, HUB_USERS, SIGN_IN)]
    sign_ins = [s for s in steady if s.kind == SIGN_IN]
    warmup = recorder.of("warmup")
    health_p95 = percentile(_latencies([s for s in steady if s.kind == HEALTH]), 0.95)
    reads_p95 = percentile(_latencies([s for s in mix if _is_admin_read(s.kind)]), 0.95)
    hub_p95 = percentile(_latencies([s for s in steady if s.kind == HUB_USERS]), 0.95)
    sign_in_p95 = percentile(_latencies(sign_ins), 0.95)
    kind, worst = worst_call(run)
    saturation = recorder.of("saturation")
    saturation_health = recorder.of("saturation_health")
    rate = len(saturation) / run.saturation_seconds
    health_rate = len(saturation_health) / run.saturation_health_seconds
    return {
        "worst": f"{_ms(worst)} ms ({_ratio(worst, target_ms / 1000)} of {target_ms:.0f} ms), `{kind}`",
        "errors": f"{sum(1 for s in mix if not s.ok)} of {len(mix):,} calls",
        "sign_in": (f"{_ms(sign_in_p95)} ms ({_ratio(sign_in_p95, sign_in_target_ms / 1000)} of "
                    f"{sign_in_target_ms:.0f} ms); {sum(1 for s in sign_ins if not s.ok)} errors in {len(sign_ins)}"),
        "sign_in_baseline": f"{_ratio(sign_in_p95, run.argon2_verify_ms / 1000)} of {run.argon2_verify_ms:.0f} ms",
        "warmup": (f"{len(warmup)} in {run.warmup_seconds:.1f} s: {len(warmup) / run.warmup_seconds:.1f}/s, "
                   f"{sum(1 for s in warmup if not s.ok)} errors; one argon2id check: "
                   f"{1000 / run.argon2_verify_ms:.1f}/s"),
        "reads": f"{_ms(reads_p95)} ms vs {_ms(health_p95)} ms: {_ratio(reads_p95, health_p95)}",
        "hub": f"{_ms(hub_p95)} ms vs {_ms(reads_p95)} ms: {_ratio(hub_p95, reads_p95)}",
        "saturation": f"{rate:,.0f} req/s vs {health_rate:,.0f} req/s: {rate / health_rate if health_rate else 0:.0%}",
        "saturation_errors": (f"{sum(1 for s in saturation if not s.ok)} of {len(saturation):,} (mix), "
                              f"{sum(1 for s in saturation_health if not s.ok)} of {len(saturation_health):,} (healthz)"),
        "saturation_p95": f"{_ms(percentile(_latencies(saturation), 0.95))} ms",
    }


def _met(run: BackendRun, target_ms: float, sign_in_target_ms: float) -> list[str]:
    """Return the targets ``run`` missed, as short phrases; empty when all were met."""
    missed = []
    steady = run.recorder.of("steady")
    mix = [s for s in steady if s.kind not in (HEALTH, HUB_USERS, SIGN_IN)]
    for kind in sorted({s.kind for s in mix}):
        p95 = percentile(_latencies([s for s in mix if s.kind == kind]), 0.95)
        if p95 * 1000 > target_ms:
            missed.append(f"p95 of `{kind}` is {_ms(p95)} ms")
    errors = sum(1 for s in mix if not s.ok)
    if errors:
        missed.append(f"{errors} calls failed")
    sign_ins = [s for s in steady if s.kind == SIGN_IN]
    sign_in_p95 = percentile(_latencies(sign_ins), 0.95)
    if sign_in_p95 * 1000 > sign_in_target_ms:
        missed.append(f"sign-in p95 is {_ms(sign_in_p95)} ms")
    if any(not s.ok for s in sign_ins):
        missed.append(f"{sum(1 for s in sign_ins if not s.ok)} sign-ins failed")
    return missed


def observations(run: BackendRun, options: Options, target_ms: float, sign_in_target_ms: float) -> list[str]:
    """Return the computed findings of one backend's run: verdict, where the time went, capacity, sign-in."""
    label = BACKEND_LABELS[run.backend]
    steady = run.recorder.of("steady")
    mix = [s for s in steady if s.kind not in (HEALTH, HUB_USERS, SIGN_IN)]
    unloaded = run.recorder.of("unloaded")
    health_p95 = percentile(_latencies([s for s in steady if s.kind == HEALTH]), 0.95)
    kinds = sorted({s.kind for s in mix})
    p95s = {kind: percentile(_latencies([s for s in mix if s.kind == kind]), 0.95) for kind in kinds}
    over = [kind for kind in kinds if p95s[kind] * 1000 > target_ms]
    missed = _met(run, target_ms, sign_in_target_ms)
    found = [f"{label}: " + ("every call kind met p95 ≤ " f"{target_ms:.0f} ms with no error, and sign-in met its target."
                             if not missed else f"targets missed: {len(over)} of {len(kinds)} call kinds above "
                             f"{target_ms:.0f} ms at p95; " + "; ".join(m for m in missed if not m.startswith("p95 of")) + ".")]
    if over and health_p95 > 0:
        ratios = [p95s[kind] / health_p95 for kind in kinds]
        unloaded_p50 = [percentile(_latencies([s for s in unloaded if s.kind == kind]), 0.5) for kind in kinds]
        before, after = run.cpu["steady"]
        admin_share = (after.admin_api - before.admin_api) / (after.at - before.at)
        found.append(
            f"{label}: the p95 of every call kind is {min(ratios):.2f}–{max(ratios):.2f}× the p95 of `GET /healthz` in "
            f"the same window, while the same calls take {_ms(min(unloaded_p50))}–{_ms(max(unloaded_p50))} ms (p50) "
            "one at a time. So the time is spent waiting in front of the routes, not in their own work. admin_api "
            f"used {admin_share:.0%} of one core, close to its limit: one uvicorn process runs Python code on one "
            "core at a time (GIL), and only argon2id and the database drivers run outside it."
        )
    mean_think = sum(options.think) / 2
    offered = len(run.summary.sign_in_users) / mean_think
    served = len([s for s in steady if s.kind != HUB_USERS]) / (run.steady[1] - run.steady[0])
    capacity = len(run.recorder.of("saturation")) / run.saturation_seconds
    before, after = run.cpu["saturation"]
    cpu_per_request = (after.admin_api - before.admin_api) / max(len(run.recorder.of("saturation")), 1)
    found.append(
        f"{label}: {len(run.summary.sign_in_users)} users with a mean think time of {mean_think:g} s ask for about "
        f"{offered:.0f} requests/s when responses are instant. Without think time admin_api served {capacity:.0f} "
        f"requests/s of the same mix, {cpu_per_request * 1000:.1f} ms of its CPU each. "
        + ("So the load is above what the server can serve here, and latency grows until the users, who wait "
           f"for each response, slow down to the rate served: {served:.0f} requests/s in the window."
           if offered > capacity else
           f"So the load is below that capacity; the window served {served:.0f} requests/s.")
    )
    sign_ins = [s for s in steady if s.kind == SIGN_IN]
    if sign_ins:
        found.append(
            f"{label}: a sign-in of an arriving user took {_ms(percentile(_latencies(sign_ins), 0.5))} ms (p50) and "
            f"{_ms(percentile(_latencies(sign_ins), 0.95))} ms (p95), against {run.argon2_verify_ms:.0f} ms for one "
            "argon2id check alone in the benchmark process. The check runs outside the GIL, but its CPU time "
            "competes with everything else on the two cores."
        )
    before, after = run.cpu["steady"]
    busy_share = (after.machine_busy - before.machine_busy) / max(after.machine_total - before.machine_total, 1)
    ours = (after.admin_api - before.admin_api) + (after.hub - before.hub) + database_cpu(before, after) + \
        (after.client - before.client)
    others = max(0.0, busy_share * (os.cpu_count() or 1) * (after.at - before.at) - ours) / (after.at - before.at)
    found.append(f"{label}: processes outside this benchmark used {others:.0%} of one core during the window, "
                 f"and the machine was {busy_share:.0%} busy.")
    for note, count in run.recorder.notes.items():
        found.append(f"{label}: {count} responses: {note}.")
    return found


def render_report(options: Options, runs: list[BackendRun], load_before: tuple[float, float, float], date: str,
                  target_ms: float, sign_in_target_ms: float) -> str:
    """Return the Markdown section: machine, data and load, summary against targets and baselines, details."""
    first = runs[0]
    labels = [BACKEND_LABELS[run.backend] for run in runs]
    load_after = "; ".join(f"after {BACKEND_LABELS[run.backend]} {'/'.join(f'{v:.1f}' for v in run.load_average)}"
                           for run in runs)
    mix = first.summary.sign_in_users
    mix_counts: dict[str, int] = {}
    for user in mix:
        mix_counts[user.role] = mix_counts.get(user.role, 0) + 1
    lines = [
        "## admin_api and JupyterHub under load (identity, institutions, audit log)",
        "",
        "Measured by `benchmarks/admin_load.py` with its helpers `load_seed.py`, `load_client.py` and",
        "`report_admin_load.py`; this section is generated by it, so rerun the script instead of editing",
        "the figures by hand.",
        "",
        "### Machine and command",
        "",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} logical cores; memory {_memory_total()}",
        f"- OS: {platform.platform()}; Python {platform.python_version()}",
        f"- admin_api: FastAPI {_version('fastapi')} on uvicorn {_version('uvicorn')}, started with the arguments "
        "of `regsandbox up`"
        + (f" plus `--workers {options.admin_workers}`" if options.admin_workers > 1 else " (one process)")
        + f"; SQLAlchemy {_version('SQLAlchemy')}, psycopg {_version('psycopg')}",
        f"- JupyterHub {_version('jupyterhub')} with configurable-http-proxy {_proxy_version()}, started as by "
        "`regsandbox up`; load client httpx " + _version("httpx"),
        f"- Databases: {', '.join(run.database_version for run in runs)} (PostgreSQL on 127.0.0.1:5432)",
        f"- Command: `{options.command}`",
        f"- Date: {date}",
        f"- Load average (1/5/15 min): before the run {'/'.join(f'{v:.1f}' for v in load_before)}; {load_after}",
        "",
        "The load client, admin_api, JupyterHub with its proxy and PostgreSQL share the same two cores,",
        "and other sessions ran tests on them during the run, so single figures are noisy. Each baseline",
        "below is measured in the same run, under the same load, as the figure it is compared with.",
        "",
        "### Data and load",
        "",
        f"- Per backend: {first.institutions:,} institutions ({first.summary.branches} of them branches), "
        f"{sum(first.users_by_role.values()):,} users: "
        + ", ".join(f"{ROLE_LABELS.get(role, role)} {count:,}" for role, count in
                    sorted(first.users_by_role.items(), key=lambda item: -item[1]))
        + f"; {first.summary.inactive_users} of them disabled. Every institution has a valid USCC (GB 32100 "
        "check character from `stdnum.cn.uscc`).",
        "- The bulk users share one precomputed argon2id hash of a random password, because hashing 20,000 "
        f"passwords one after another at about {first.argon2_verify_ms:.0f} ms each would take "
        f"{20000 * first.argon2_verify_ms / 1000 / 60:.0f} minutes. Hashes use the default cost of "
        "`REGSANDBOX_PASSWORD_HASH_*` (argon2id, 46 MiB, one pass, one lane). The "
        f"{len(mix)} users who sign in have their own passwords and argon2id hashes, so every sign-in runs the "
        "real verification.",
        "- TOTP stays required for the roles of the default `REGSANDBOX_TOTP_REQUIRED_ROLES`: the signing-in "
        "users of those roles have a confirmed TOTP secret (SM4-GCM under the platform data key, as admin_api "
        "stores it) and send a current code with their sign-in.",
        f"- Each signing-in user has {MESSAGES_PER_SIGNED_IN_USER} messages, {UNREAD_MESSAGES_PER_SIGNED_IN_USER} "
        f"unread. The audit log holds {first.summary.audit_events:,} events over 90 days before the run, chained "
        "by admin_api's own SM3 listener, plus every event the run writes.",
        f"- {len(mix)} virtual users: " + ", ".join(f"{ROLE_LABELS.get(role, role)} {count}" for role, count in
                                                   sorted(mix_counts.items(), key=lambda item: -item[1]))
        + f". They sign in before the load, {options.warmup_concurrency} at a time, then each calls with a think "
        f"time drawn uniformly from {options.think[0]}–{options.think[1]} s during a steady window of "
        f"{options.duration:.0f} s. Meanwhile one more user signs in every {options.sign_in_interval:g} s "
        f"({len(first.summary.arriving_users)} users of the same role mix, each with its own argon2id hash), "
        "which gives the sign-in latency under load.",
        "- Calls by role: 系统管理员 search, page and read users and institutions and edit both (PATCH "
        "contact phone, PATCH display name); 监管审查员 search, page and read institutions and mark messages "
        "read; 安全管理员 list keys; 审计管理员 page and filter the audit log (by actor, by action and "
        "outcome, by institution); 建模人员 and 报送人员 read themselves, their inbox and their own "
        "institution and mark messages read. Every role also reads `/me` and its inbox.",
        f"- Two probes run through the steady window: `GET /healthz` every "
        f"{options.probe_interval} s (the baseline: the public liveness route, which does no work of its own), "
        "and JupyterHub's "
        f"`GET /hub/api/users` every {options.probe_interval} s through the proxy, with the token of the hub "
        f"service `regsandbox`; {first.hub_user_count} modellers signed in at the hub's login form beforehand.",
        f"- Saturation: {options.saturation_workers} loops without think time, each as one signed-in virtual "
        f"user with the same mix, for {options.saturation_seconds:.0f} s; then {options.saturation_workers} loops "
        f"of `GET /healthz` for {options.saturation_seconds / 2:.0f} s as the baseline.",
        "- JupyterHub runs as `regsandbox up` starts it, with its managed user-sync service, which reads every "
        "admin_api user (in pages of 1,000) every `REGSANDBOX_HUB_USER_SYNC_SECONDS` (default 15 s); that "
        "traffic is part of the load on admin_api.",
        "- An error is any response other than HTTP 200, or no response within 30 s.",
        "",
        "### Summary",
        "",
        "| Figure | Target or baseline | " + " | ".join(labels) + " |",
        "|---|---|" + "---:|" * len(runs),
    ]
    figures = [summary_figures(run, target_ms, sign_in_target_ms) for run in runs]
    rows = [
        ("Highest p95 of one call kind, steady window", f"≤ {target_ms:.0f} ms", "worst"),
        ("Failed calls, steady window", "0", "errors"),
        ("Sign-in p95 (`POST /auth/token`) of users arriving during the steady window", f"≤ {sign_in_target_ms:.0f} ms",
         "sign_in"),
        ("Sign-in p95 against one argon2id verification", "argon2id verify alone, this process", "sign_in_baseline"),
        (f"Sign-in throughput: the virtual users signing in before the load, {options.warmup_concurrency} at a time",
         "one argon2id check after another", "warmup"),
        ("admin_api p95 of all GET calls against `GET /healthz` p95", "`/healthz` under the same load", "reads"),
        ("JupyterHub `GET /hub/api/users` p95 against admin_api GET p95", "admin_api GET calls, same window", "hub"),
        ("Saturation throughput, mix against `GET /healthz`", "`/healthz` with the same loops", "saturation"),
        ("Saturation errors", "0", "saturation_errors"),
        ("Saturation p95 (mix)", "—", "saturation_p95"),
    ]
    for label, target, key in rows:
        lines.append(f"| {label} | {target} | " + " | ".join(figure[key] for figure in figures) + " |")

    for run in runs:
        lines += _backend_sections(run, options, target_ms)

    lines += ["", "### Observations", ""]
    for run in runs:
        lines += [f"- {line}" for line in observations(run, options, target_ms, sign_in_target_ms)]
    return "\n".join(lines) + "\n"


def _backend_sections(run: BackendRun, options: Options, target_ms: float) -> list[str]:
    label = BACKEND_LABELS[run.backend]
    recorder = run.recorder
    steady = recorder.of("steady")
    health_p95 = percentile(_latencies([s for s in steady if s.kind == HEALTH]), 0.95)
    kinds = sorted({s.kind for s in steady} - {HEALTH, HUB_USERS, SIGN_IN})
    lines = [
        "",
        f"### {label}: calls with think time",
        "",
        f"Steady window of {run.steady[1] - run.steady[0]:.0f} s. Latency in ms, "
        "from sending the request to reading the whole response. Baselines: the "
        f"{target_ms:.0f} ms target (500 ms for sign-in), the p95 of `GET /healthz` in the same window, and the "
        f"p50 of the same call sent {options.unloaded_rounds} times one at a time after the load (unloaded), "
        "with admin_api's CPU time per request in that unloaded run (from /proc, in ticks of 10 ms over all "
        f"{options.unloaded_rounds} requests).",
        "",
        "| Call | Calls | Errors | p50 | p95 | p99 | max | p95 / target | p95 / healthz p95 | unloaded p50 | "
        "p95 / unloaded p50 | CPU ms per request, unloaded |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    unloaded = recorder.of("unloaded")
    for kind in kinds:
        lines.append(_stats_row(f"`{kind}`", [s for s in steady if s.kind == kind], target_ms, health_p95,
                                [s for s in unloaded if s.kind == kind], run.unloaded_cpu.get(kind)))
    lines.append(_stats_row(f"`{SIGN_IN}`", [s for s in steady if s.kind == SIGN_IN], 500.0, health_p95, [], None))
    lines.append(_stats_row(f"`{HEALTH}`", [s for s in steady if s.kind == HEALTH], None, None,
                            [s for s in unloaded if s.kind == HEALTH], None))
    lines.append(_stats_row(f"`{HUB_USERS}`", [s for s in steady if s.kind == HUB_USERS], None, health_p95, [], None))
    warmup = recorder.of("warmup")
    lines += ["", f"Before the window, {len(warmup)} virtual users signed in, {options.warmup_concurrency} at a time, in "
                  f"{run.warmup_seconds:.1f} s: sign-in p50 {_ms(percentile(_latencies(warmup), 0.5))} ms, p95 "
                  f"{_ms(percentile(_latencies(warmup), 0.95))} ms, {sum(1 for s in warmup if not s.ok)} errors."]

    lines += [
        "",
        f"### {label}: saturation and CPU",
        "",
        "CPU of each process in % of one core (PostgreSQL: the backends of the benchmark's database, an "
        "underestimate because backends that exit during a phase are not counted); machine busy in % of all "
        f"{os.cpu_count()} cores. Other processes are everything else on the machine, such as other test runs.",
        "",
        "| Phase | Requests | Requests/s | Errors | p50 | p95 | admin_api CPU | JupyterHub, proxy, user sync | PostgreSQL | "
        "Load client | Other processes | Machine busy |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    phases = [
        ("Think time, steady window", steady, run.steady[1] - run.steady[0], "steady"),
        (f"Saturation, mix, {options.saturation_workers} loops", recorder.of("saturation"), run.saturation_seconds,
         "saturation"),
        (f"Saturation, `GET /healthz`, {options.saturation_workers} loops", recorder.of("saturation_health"),
         run.saturation_health_seconds, "saturation_health"),
    ]
    for name, samples, seconds, key in phases:
        admin_samples = [s for s in samples if s.kind != HUB_USERS]
        values = _latencies(admin_samples)
        before, after = run.cpu[key]
        lines.append(
            f"| {name} | {len(admin_samples):,} | {len(admin_samples) / seconds:,.1f} | "
            f"{sum(1 for s in admin_samples if not s.ok)} | {_ms(percentile(values, 0.5))} | "
            f"{_ms(percentile(values, 0.95))} | {_cpu_line(before, after, len(admin_samples))}"
        )
    lines += ["", f"Seeding took {run.seed_seconds:.0f} s."]
    return lines
