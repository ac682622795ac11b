"""System messages (系统消息): a per-user inbox that other modules post to.

:func:`post_message` adds one message per active recipient to the caller's session, so a decision
and its notifications are committed together. Every read, mark and delete function takes the
caller's user id and filters on it, so no user can read or change another user's messages. The id
of someone else's message gets the same 404 as an unknown id, and the attempt is audited as denied.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from fastapi import Request
from pydantic import BaseModel
from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from admin_api.audit import add_event
from admin_api.db import utc_now
from admin_api.deps import deny
from admin_api.errors import ApiError, not_found
from admin_api.models import Institution, Message, User
from admin_api.security import Principal

CATEGORY_NAMES = {
    "model_review": "模型审查结论",
    "notebook_approval": "报告笔记本审批",
    "system": "系统通知",
}
MAX_TITLE_LENGTH = 200
MAX_BODY_LENGTH = 4000
MAX_PAGE_SIZE = 100


class MessageOut(BaseModel):
    id: int
    category: str
    category_name: str
    title: str
    body: str
    link: str | None
    created_at: datetime
    read_at: datetime | None

    @classmethod
    def of(cls, row: Message) -> MessageOut:
        return cls(id=row.id, category=row.category, category_name=CATEGORY_NAMES.get(row.category, row.category),
                   title=row.title, body=row.body, link=row.link, created_at=row.created_at, read_at=row.read_at)


class MessagePage(BaseModel):
    items: list[MessageOut]
    total: int
    unread: int
    offset: int
    limit: int


class MarkedOut(BaseModel):
    count: int
    """Messages that this request changed."""
    unread: int


def _check_link(link: str | None) -> str | None:
    """Accept only a path on this site (``/console/...``), so a message cannot send its reader elsewhere."""
    if link is None:
        return None
    if not link.startswith("/") or link.startswith("//") or "\\" in link or len(link) > 500:
        raise ValueError(f"message link must be a path on this site, got {link!r}")
    return link


def post_message(
    session: Session,
    *,
    category: str,
    title: str,
    body: str = "",
    link: str | None = None,
    usernames: Iterable[str] | None = None,
    institution: str | None = None,
    role: str | None = None,
) -> int:
    """Add a message to the inbox of each active recipient and return how many were added; the caller commits.

    Recipients are either ``usernames`` or every active user with ``role`` (optionally only those of
    ``institution``, an institution code). Inactive and unknown users are skipped. Raises
    ValueError for an unknown category, an empty title, a foreign link or no recipient selector,
    because those are programming errors of the calling module.
    """
    if category not in CATEGORY_NAMES:
        raise ValueError(f"unknown message category {category!r}; known: {', '.join(CATEGORY_NAMES)}")
    title = title.strip()[:MAX_TITLE_LENGTH]
    if not title:
        raise ValueError("message title is empty")
    link = _check_link(link)
    query = select(User.id).where(User.is_active.is_(True))
    if usernames is not None:
        query = query.where(User.username.in_(list(usernames)))
    elif role is not None:
        query = query.where(User.role == role)
        if institution is not None:
            query = query.join(Institution, User.institution_id == Institution.id).where(Institution.code == institution)
    else:
        raise ValueError("post_message needs usernames or a role")
    recipients = list(session.scalars(query.order_by(User.id)))
    for user_id in recipients:
        session.add(Message(user_id=user_id, category=category, title=title, body=body[:MAX_BODY_LENGTH], link=link))
    return len(recipients)


def unread_count(session: Session, user_id: int) -> int:
    return session.scalar(
        select(func.count()).select_from(Message)
        .where(Message.user_id == user_id, Message.deleted.is_(False), Message.read_at.is_(None))
    ) or 0


def user_id_of(session: Session, principal: Principal) -> int:
    if principal.user_id is not None:
        return principal.user_id
    return session.scalars(select(User.id).where(User.username == principal.username)).one()


def list_messages(session: Session, user_id: int, offset: int, limit: int, unread_only: bool = False) -> MessagePage:
    """Return one page of the user's messages, newest first, with the total and unread counts."""
    condition = [Message.user_id == user_id, Message.deleted.is_(False)]
    counts = session.execute(
        select(func.count(), func.coalesce(func.sum(case((Message.read_at.is_(None), 1), else_=0)), 0))
        .select_from(Message).where(*condition)
    ).one()
    total, unread = int(counts[0]), int(counts[1])
    if unread_only:
        condition.append(Message.read_at.is_(None))
        total = unread
    rows = session.scalars(select(Message).where(*condition).order_by(Message.id.desc()).offset(offset).limit(limit))
    return MessagePage(items=[MessageOut.of(row) for row in rows], total=total, unread=unread, offset=offset, limit=limit)


def _own_message(session: Session, request: Request, caller: Principal, user_id: int, message_id: int) -> Message:
    """Return the caller's undeleted message; another user's message is denied (audited) with the same 404."""
    row = session.get(Message, message_id)
    missing: ApiError = not_found("MESSAGE_NOT_FOUND", f"消息 {message_id} 不存在或已删除，请刷新消息列表。")
    if row is None or row.deleted:
        raise missing
    if row.user_id != user_id:
        raise deny(request, caller, "messages.own", missing)
    return row


def mark_read(session: Session, request: Request, caller: Principal, message_id: int) -> MarkedOut:
    user_id = user_id_of(session, caller)
    row = _own_message(session, request, caller, user_id, message_id)
    changed = 0
    if row.read_at is None:
        row.read_at = utc_now()
        changed = 1
        add_event(session, request, caller, "messages.read", f"message:{message_id}")
    session.commit()
    return MarkedOut(count=changed, unread=unread_count(session, user_id))


def mark_all_read(session: Session, request: Request, caller: Principal) -> MarkedOut:
    user_id = user_id_of(session, caller)
    result = session.execute(
        update(Message)
        .where(Message.user_id == user_id, Message.deleted.is_(False), Message.read_at.is_(None))
        .values(read_at=utc_now())
    )
    add_event(session, request, caller, "messages.read_all", f"user:{caller.username}", "success",
              {"count": result.rowcount})
    session.commit()
    return MarkedOut(count=result.rowcount, unread=0)


def delete_message(session: Session, request: Request, caller: Principal, message_id: int) -> MarkedOut:
    user_id = user_id_of(session, caller)
    row = _own_message(session, request, caller, user_id, message_id)
    row.deleted = True
    add_event(session, request, caller, "messages.delete", f"message:{message_id}")
    session.commit()
    return MarkedOut(count=1, unread=unread_count(session, user_id))
