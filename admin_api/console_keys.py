"""The console page 密钥管理: key versions for security and audit administrators.

Both roles see every key version grouped by owner and kind. Security administrators also get
the forms to rotate, activate, revoke and destroy versions. The forms call the same functions as
the API (:mod:`admin_api.key_management`), so every action is audited as ``key.<operation>``.
A successful form redirects to the page with a result message, and a rejected one shows the
Chinese message above the table.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from admin_api.console import _check_csrf, _page
from admin_api.deps import get_session, require
from admin_api.key_management import (
    REASON_MAX_LENGTH,
    REASON_MIN_LENGTH,
    activate_key,
    destroy_key,
    key_label,
    list_keys,
    revoke_key,
    rotate_key,
)
from admin_api.schemas import KeyVersionOut
from admin_api.security import Principal
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.keystore import STATE_ACTIVE, STATE_DECRYPT_ONLY, STATE_DESTROYED, STATE_PENDING, STATE_REVOKED

router = APIRouter(prefix="/console", include_in_schema=False)

_NOTICES = {
    "rotated": "已轮换密钥：新版本 {} 已启用，原启用版本（如有）改为仅解密。",
    "activated": "已启用密钥版本 {}，原启用版本（如有）改为仅解密。",
    "revoked": "已吊销密钥版本 {}，它不能再用于加密、解密或签名验证。",
    "destroyed": "已销毁密钥版本 {} 的密钥材料，它保护的数据已无法解密。",
}
_LABEL = re.compile(r"^[a-z][a-z0-9_]{1,31}/(data|token|signing)/v[1-9][0-9]{0,8}$")


def _notice(request: Request) -> str | None:
    """Return the result message named by the query string after a successful form, or None."""
    done = request.query_params.get("done", "")
    label = request.query_params.get("key", "")
    if done in _NOTICES and _LABEL.match(label):
        return _NOTICES[done].format(label)
    return None


def _groups(versions: list[KeyVersionOut]) -> list[dict[str, Any]]:
    """Group the sorted versions by owner and kind, with the actions each version allows."""
    groups: list[dict[str, Any]] = []
    for item in versions:
        if not groups or (groups[-1]["owner"], groups[-1]["kind"]) != (item.owner, item.kind):
            groups.append({"owner": item.owner, "owner_name": item.owner_name, "kind": item.kind,
                           "kind_name": item.kind_name, "versions": [], "has_active": False})
        group = groups[-1]
        group["versions"].append({
            "item": item,
            "label": key_label(item.owner, item.kind, item.version),
            "can_activate": item.state in (STATE_PENDING, STATE_DECRYPT_ONLY),
            "can_revoke": item.state not in (STATE_REVOKED, STATE_DESTROYED),
            "can_destroy": item.state not in (STATE_ACTIVE, STATE_DESTROYED),
        })
        group["has_active"] = group["has_active"] or item.state == STATE_ACTIVE
    return groups


def _keys_page(request: Request, session: Session, caller: Principal, *, status_code: int = 200,
               error: str | None = None) -> Response:
    listing = list_keys(request, session, caller, audit=error is None)
    return _page(request, "keys.html", caller, status_code=status_code, master_key_id=listing.master_key_id,
                 groups=_groups(listing.keys), notice=None if error else _notice(request), error=error,
                 reason_min=REASON_MIN_LENGTH, reason_max=REASON_MAX_LENGTH)


def _done(action: str, owner: str, kind: str, version: int) -> Response:
    return RedirectResponse(f"/console/keys?done={action}&key={key_label(owner, kind, version)}", status_code=303)


@router.get("/keys", response_class=HTMLResponse)
def keys_page(request: Request, session: Session = Depends(get_session),
              caller: Principal = Depends(require("keys.read", console=True))) -> Response:
    """Show every key version; security administrators also get the forms that change them."""
    return _keys_page(request, session, caller)


@router.post("/keys/{owner}/{kind}/rotate", response_class=HTMLResponse)
def rotate_form(
    owner: str,
    kind: str,
    request: Request,
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("keys.operate", console=True)),
) -> Response:
    """Rotate ``owner/kind`` (same as POST /api/v1/keys/{owner}/{kind}/rotate)."""
    _check_csrf(request, caller, "keys.operate", csrf)
    try:
        created = rotate_key(request, session, caller, owner, kind)
    except RegsandboxError as error:
        return _keys_page(request, session, caller, status_code=error.status, error=error.message)
    return _done("rotated", owner, kind, created.version)


@router.post("/keys/{owner}/{kind}/versions/{version}/activate", response_class=HTMLResponse)
def activate_form(
    owner: str,
    kind: str,
    version: int,
    request: Request,
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("keys.operate", console=True)),
) -> Response:
    """Activate a pending or decrypt_only version."""
    _check_csrf(request, caller, "keys.operate", csrf)
    try:
        activate_key(request, session, caller, owner, kind, version)
    except RegsandboxError as error:
        return _keys_page(request, session, caller, status_code=error.status, error=error.message)
    return _done("activated", owner, kind, version)


@router.post("/keys/{owner}/{kind}/versions/{version}/revoke", response_class=HTMLResponse)
def revoke_form(
    owner: str,
    kind: str,
    version: int,
    request: Request,
    reason: str = Form(default="", max_length=1000),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("keys.operate", console=True)),
) -> Response:
    """Revoke a version with the reason typed into the form."""
    _check_csrf(request, caller, "keys.operate", csrf)
    try:
        revoke_key(request, session, caller, owner, kind, version, reason)
    except RegsandboxError as error:
        return _keys_page(request, session, caller, status_code=error.status, error=error.message)
    return _done("revoked", owner, kind, version)


@router.post("/keys/{owner}/{kind}/versions/{version}/destroy", response_class=HTMLResponse)
def destroy_form(
    owner: str,
    kind: str,
    version: int,
    request: Request,
    confirm: str = Form(default="", max_length=200),
    csrf: str = Form(default="", alias="csrf_token", max_length=200),
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("keys.operate", console=True)),
) -> Response:
    """Destroy a version after the administrator typed its label ``owner/kind/vN`` into the form."""
    _check_csrf(request, caller, "keys.operate", csrf)
    try:
        destroy_key(request, session, caller, owner, kind, version, confirm)
    except RegsandboxError as error:
        return _keys_page(request, session, caller, status_code=error.status, error=error.message)
    return _done("destroyed", owner, kind, version)
