"""Settle warehouse partitions that a crash left between the partition rename and the database commit.

Accepting a submission writes its warehouse partition first and commits the state change after it
(:func:`admin_api.submissions.review`). A process killed between the two leaves hidden copies of the
replaced partition beside the new one. At start-up, before any request is served,
:func:`recover_warehouse` queries the database for the submissions named in those folders that a
reviewer accepted, and :func:`intake.warehouse.recover_interrupted_loads` keeps the newest accepted
state of each folder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from sqlalchemy import select
from sqlalchemy.orm import Session

from admin_api.models import SubmissionEvent
from intake.warehouse import recover_interrupted_loads
from regsandbox_core.settings import Settings

logger = logging.getLogger(__name__)


def recover_warehouse(session_factory: Callable[[], Session], settings: Settings) -> int:
    """Settle the interrupted loads of the warehouse and return how many partition folders were settled."""

    def accepted(ids: set[int]) -> Collection[int]:
        with session_factory() as session:
            return set(session.scalars(
                select(SubmissionEvent.submission_id).where(SubmissionEvent.submission_id.in_(sorted(ids)),
                                                            SubmissionEvent.to_state == "accepted")))

    settled = recover_interrupted_loads(settings, accepted)
    if settled:
        logger.warning("settled %d warehouse partition folder(s) left by an interrupted load", len(settled))
    return len(settled)
