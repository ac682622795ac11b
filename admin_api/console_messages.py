"""The console page 系统消息: every signed-in user's own inbox, and the unread badge of the navigation bar.

The forms call the same functions as the API (:mod:`admin_api.messages`), so a user can only see,
mark and delete their own messages, and the changes are audited the same way.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import pass_context
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from admin_api.console import _check_csrf, _page
from admin_api.deps import get_session, require
from admin_api.messages import delete_message, list_messages, mark_all_read, mark_read, unread_count, user_id_of
from admin_api.models import User
from admin_api.security import Principal, allows

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/console", include_in_schema=False)

PAGE_SIZE = 20
_NOTICES = {
    "read": "已将消息标记为已读。",
    "read_all": "已将全部消息标记为已读。",
    "deleted": "已删除消息。",
}


@pass_context
def _unread_messages(context: Any) -> int:
    """Return the unread count of the signed-in user of the page being rendered; 0 without a user or on errors."""
    principal = context.get("principal")
    request = context.get("request")
    if principal is None or request is None or not allows(principal.role, "messages.own"):
        return 0
    try:
        with request.app.state.session_factory() as session:
            user_id = session.scalars(select(User.id).where(User.username == principal.username)).first()
            return unread_count(session, user_id) if user_id is not None else 0
    except SQLAlchemyError:
        logger.exception("unread message count of %s failed", principal.username)
        return 0


def install_unread_badge(templates: Jinja2Templates) -> None:
    """Make ``unread_messages()`` available to base.html for the badge next to 系统消息."""
    templates.env.globals["unread_messages"] = _unread_messages


def _back(page: int, done: str) -> Response:
    return RedirectResponse(f"/console/messages?page={page}&done={done}", status_code=303)


@router.get("/messages", response_class=HTMLResponse)
def messages_page(
    request: Request,
    page: int = Query(default=1, ge=1, le=100000),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("messages.own", console=True)),
) -> Response:
    """Show one page of the caller's messages, newest first."""
    listing = list_messages(session, user_id_of(session, caller), (page - 1) * PAGE_SIZE, PAGE_SIZE)
    pages = max(1, (listing.total + PAGE_SIZE - 1) // PAGE_SIZE)
    return _page(request, "messages.html", caller, listing=listing, page=page, pages=pages,
                 notice=_NOTICES.get(request.query_params.get("done", "")))


@router.post("/messages/read-all")
def read_all_form(
    request: Request,
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("messages.own", console=True)),
) -> Response:
    _check_csrf(request, caller, "messages.own", csrf)
    mark_all_read(session, request, caller)
    return _back(1, "read_all")


@router.post("/messages/{message_id}/read")
def read_form(
    message_id: int,
    request: Request,
    page: int = Form(default=1, ge=1, le=100000),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("messages.own", console=True)),
) -> Response:
    _check_csrf(request, caller, "messages.own", csrf)
    mark_read(session, request, caller, message_id)
    return _back(page, "read")


@router.post("/messages/{message_id}/delete")
def delete_form(
    message_id: int,
    request: Request,
    page: int = Form(default=1, ge=1, le=100000),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("messages.own", console=True)),
) -> Response:
    _check_csrf(request, caller, "messages.own", csrf)
    delete_message(session, request, caller, message_id)
    return _back(page, "deleted")
