"""Rebuilding extracts in the background after a class change or an accepted submission.

A class decides how a column is masked, so after a confirmation or change of a column of table
``T`` the extracts of every institution with warehouse data of ``T`` are rebuilt
(:func:`affected_institutions`). Accepted report data enters the extracts the same way: after a
reviewer accepts a submission, the extract of its institution is rebuilt. The incremental build
masks only the new period. Other institutions get the changed cross-institution features at their
next build, and only where their rows change. The request only queues them: one worker thread per
admin_api process builds the queued institutions one after another through
:func:`admin_api.extract_builds.run_builds`, which audits each outcome in the requester's name with
trigger ``catalog_change`` or ``submission_accepted``. The queue is bounded by the number of institutions, because an
institution already waiting is not queued twice (the build that runs later reads the newest
classes anyway). The builder's lock per institution keeps a queued build and a manual one from
overlapping.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker

from admin_api.data_catalog import warehouse_institutions
from admin_api.extract_builds import BuildActor, run_builds
from admin_api.security import Principal
from extracts.builder import INSTITUTION_CODE
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.keystore import KeyStore
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 30.0
"""How long shutdown waits for the build in progress before leaving the daemon thread behind."""


def affected_institutions(settings: Settings, table_code: str) -> list[str]:
    """Return the institutions with at least one warehouse partition of intake table ``table_code``."""
    return [code for code in warehouse_institutions(settings, table_code) if INSTITUTION_CODE.match(code)]


class RebuildQueue:
    """Institutions waiting for a rebuild, and the worker thread that builds them in order."""

    def __init__(self, session_factory: sessionmaker[Session], settings: Settings, keystore: KeyStore) -> None:
        self._session_factory = session_factory
        self._settings = settings
        self._keystore = keystore
        self._pending: OrderedDict[str, tuple[BuildActor, str, str]] = OrderedDict()
        self._running: str | None = None
        self._condition = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def schedule(self, table_code: str, column_code: str, actor: BuildActor) -> list[str]:
        """Queue the institutions with data of ``table_code``; return their codes (empty when none has data)."""
        codes = affected_institutions(self._settings, table_code)
        reason = f"字段 {table_code}.{column_code} 的分级分类已变更"
        return self.schedule_institutions(codes, actor, "catalog_change", reason)

    def schedule_institutions(self, codes: list[str], actor: BuildActor, trigger: str, reason: str) -> list[str]:
        """Queue the extracts of ``codes`` for a rebuild audited with ``trigger`` and ``reason``; return the codes queued."""
        if not codes:
            return []
        with self._condition:
            if self._stopping:
                logger.warning("extract rebuilds of %s (%s) not queued: admin_api is stopping", ", ".join(codes), trigger)
                return []
            for code in codes:
                self._pending[code] = (actor, trigger, reason)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="extract-rebuilds", daemon=True)
                self._thread.start()
            self._condition.notify_all()
        logger.info("queued extract rebuilds of %s (%s: %s)", ", ".join(codes), trigger, reason)
        return codes

    def pending(self) -> list[str]:
        with self._condition:
            return ([self._running] if self._running else []) + list(self._pending)

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or building; return False when ``timeout`` seconds passed first."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._pending and self._running is None, timeout=timeout)

    def stop(self) -> None:
        """Drop what is still queued, let the build in progress finish (up to STOP_TIMEOUT_SECONDS) and end the thread."""
        with self._condition:
            self._stopping = True
            dropped = list(self._pending)
            self._pending.clear()
            self._condition.notify_all()
            thread = self._thread
        if dropped:
            logger.warning("admin_api stopping: queued extract rebuilds of %s dropped", ", ".join(dropped))
        if thread is not None:
            thread.join(STOP_TIMEOUT_SECONDS)

    def _next(self) -> tuple[str, BuildActor, str, str] | None:
        with self._condition:
            self._running = None
            self._condition.notify_all()
            self._condition.wait_for(lambda: self._pending or self._stopping)
            if self._stopping:
                return None
            code, (actor, trigger, reason) = self._pending.popitem(last=False)
            self._running = code
            return code, actor, trigger, reason

    def _work(self) -> None:
        while (item := self._next()) is not None:
            code, actor, trigger, reason = item
            try:
                run_builds(self._session_factory, self._settings, self._keystore, actor, [code],
                           trigger=trigger, reason=reason, unix_group_prefix=self._settings.unix_prefix)
            except RegsandboxError as error:  # run_builds audited it already
                logger.warning("rebuild of the extract of %s failed: %s", code, error.code)
            except Exception:  # noqa: BLE001 - the worker must survive to build the next institution
                logger.exception("rebuild of the extract of %s failed unexpectedly", code)


def schedule_after_classification(request: Request, caller: Principal, table_code: str, column_code: str) -> list[str]:
    """Queue the rebuilds after a committed class confirmation or change; return the institutions queued."""
    queue: RebuildQueue = request.app.state.extract_rebuilds
    return queue.schedule(table_code, column_code, BuildActor.of_request(request, caller))


def schedule_after_accept(request: Request, caller: Principal, institution_code: str, template_code: str,
                          period: str) -> list[str]:
    """Queue the rebuild of ``institution_code``'s extract after a committed accept; return the institutions queued."""
    queue: RebuildQueue | None = getattr(request.app.state, "extract_rebuilds", None)
    if queue is None or not INSTITUTION_CODE.match(institution_code):
        return []
    reason = f"报表 {template_code} 报告期 {period} 审核通过"
    return queue.schedule_institutions([institution_code], BuildActor.of_request(request, caller),
                                       "submission_accepted", reason)
