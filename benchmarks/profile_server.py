"""Run uvicorn under cProfile in every thread and write where admin_api spends its CPU time.

    python benchmarks/profile_server.py OUTPUT.txt admin_api.app:create_server_app --factory --host 127.0.0.1 ...

The arguments after OUTPUT.txt are uvicorn's; ``admin_load.py --profile-dir`` starts admin_api
this way. A cProfile profiler sees only the thread that enables it, and FastAPI runs synchronous
dependencies and routes in anyio worker threads, so this wrapper profiles the event loop's thread
and, through a wrapper around ``anyio.to_thread.run_sync``, each call in a worker thread. The
timer is ``time.thread_time``, so time spent waiting (for the GIL, a lock, the database) is not
counted. cProfile slows the server down several times, so latencies of a profiled run are not
comparable with other runs. The merged report (OUTPUT.txt, and OUTPUT.prof for pstats) is
written when uvicorn exits after SIGTERM, which ``ProcessGroup.stop_all`` sends.
``kill -USR1 PID`` appends the stack of every thread to OUTPUT.stacks, to see where a hung
server waits.
"""

from __future__ import annotations

import cProfile
import faulthandler
import io
import pstats
import signal
import sys
import threading
import time
from pathlib import Path

TOP_ROWS = 45

_profiles: list[cProfile.Profile] = []
_profiles_lock = threading.Lock()
_local = threading.local()


def _new_profile() -> cProfile.Profile:
    profile = cProfile.Profile(time.thread_time)
    with _profiles_lock:
        _profiles.append(profile)
    return profile


def _thread_profile() -> cProfile.Profile:
    profile = getattr(_local, "profile", None)
    if profile is None:
        profile = _local.profile = _new_profile()
    return profile


def _profile_worker_threads() -> None:
    """Wrap ``anyio.to_thread.run_sync`` so that every function it runs in a worker thread is profiled."""
    import anyio.to_thread

    original = anyio.to_thread.run_sync

    async def run_sync(func, *args, **kwargs):  # type: ignore[no-untyped-def]
        def profiled(*inner_args):  # type: ignore[no-untyped-def]
            profile = _thread_profile()
            profile.enable()
            try:
                return func(*inner_args)
            finally:
                profile.disable()

        return await original(profiled, *args, **kwargs)

    anyio.to_thread.run_sync = run_sync


def _report(output: Path) -> None:
    with _profiles_lock:
        profiles = list(_profiles)
    for profile in profiles:
        profile.create_stats()
    stats = pstats.Stats(profiles[0])
    for profile in profiles[1:]:
        stats.add(profile)
    stats.dump_stats(str(output.with_suffix(".prof")))
    text = io.StringIO()
    stats.stream = text
    stats.strip_dirs()
    text.write(f"CPU time (time.thread_time) of {len(profiles)} threads\n\n")
    stats.sort_stats("tottime").print_stats(TOP_ROWS)
    stats.sort_stats("cumulative").print_stats(TOP_ROWS)
    output.write_text(text.getvalue(), encoding="utf-8")


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    output = Path(sys.argv[1])
    # uvicorn restores the handler it found and raises the signal again after its graceful shutdown;
    # this handler turns that into SystemExit, so the report below is still written.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    stacks = open(output.with_suffix(".stacks"), "a", encoding="utf-8")  # noqa: SIM115 (open until exit)
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    _profile_worker_threads()
    import uvicorn.main

    main_profile = _new_profile()
    main_profile.enable()
    try:
        uvicorn.main.main(sys.argv[2:], standalone_mode=False)
    finally:
        main_profile.disable()
        _report(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
