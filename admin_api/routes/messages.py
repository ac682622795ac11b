"""系统消息: every signed-in user reads and handles the messages of their own inbox only."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from sqlalchemy.orm import Session

from admin_api.deps import get_session, require
from admin_api.messages import (
    MAX_PAGE_SIZE,
    MarkedOut,
    MessagePage,
    delete_message,
    list_messages,
    mark_all_read,
    mark_read,
    user_id_of,
)
from admin_api.security import Principal

router = APIRouter()


@router.get("/messages", response_model=MessagePage)
def messages_list(
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("messages.own")),
    offset: int = Query(default=0, ge=0),
    limit: int = Query(default=20, ge=1, le=MAX_PAGE_SIZE),
    unread_only: bool = Query(default=False),
) -> MessagePage:
    """List the caller's messages, newest first, with the unread count."""
    return list_messages(session, user_id_of(session, caller), offset, limit, unread_only)


@router.post("/messages/read-all", response_model=MarkedOut)
def messages_read_all(request: Request, session: Session = Depends(get_session),
                      caller: Principal = Depends(require("messages.own"))) -> MarkedOut:
    return mark_all_read(session, request, caller)


@router.post("/messages/{message_id}/read", response_model=MarkedOut)
def messages_read(message_id: int, request: Request, session: Session = Depends(get_session),
                  caller: Principal = Depends(require("messages.own"))) -> MarkedOut:
    return mark_read(session, request, caller, message_id)


@router.delete("/messages/{message_id}", response_model=MarkedOut)
def messages_delete(message_id: int, request: Request, session: Session = Depends(get_session),
                    caller: Principal = Depends(require("messages.own"))) -> MarkedOut:
    return delete_message(session, request, caller, message_id)
