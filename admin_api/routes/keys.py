"""Key management: the security administrator rotates, activates, revokes and destroys key versions.

Security and audit administrators list the versions (``keys.read``); only security
administrators change them (``keys.operate``). Responses contain states, times and public keys,
never key material.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from sqlalchemy.orm import Session

from admin_api.deps import get_session, require
from admin_api.key_management import activate_key, destroy_key, list_keys, revoke_key, rotate_key
from admin_api.schemas import KeyDestroyRequest, KeyListOut, KeyRevokeRequest, KeyVersionOut
from admin_api.security import Principal

router = APIRouter()

OwnerPath = Annotated[str, Path(max_length=64, description="机构代码或 platform")]
KindPath = Annotated[str, Path(max_length=32, description="data、token 或 signing")]
VersionPath = Annotated[int, Path(ge=1, description="版本号（从 1 开始）")]


@router.get("/keys", response_model=KeyListOut)
def keys_list(
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("keys.read")),
) -> KeyListOut:
    """List the master key id and every key version with its state and times (no key material)."""
    return list_keys(request, session, caller)


@router.post("/keys/{owner}/{kind}/rotate", response_model=KeyVersionOut, status_code=201)
def keys_rotate(
    request: Request,
    owner: OwnerPath,
    kind: KindPath,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("keys.operate")),
) -> KeyVersionOut:
    """Generate and activate a new version; the previous active version only decrypts from now on."""
    return rotate_key(request, session, caller, owner, kind)


@router.post("/keys/{owner}/{kind}/versions/{version}/activate", response_model=KeyVersionOut)
def keys_activate(
    request: Request,
    owner: OwnerPath,
    kind: KindPath,
    version: VersionPath,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("keys.operate")),
) -> KeyVersionOut:
    """Activate a pending or decrypt_only version, e.g. to undo a rotation."""
    return activate_key(request, session, caller, owner, kind, version)


@router.post("/keys/{owner}/{kind}/versions/{version}/revoke", response_model=KeyVersionOut)
def keys_revoke(
    body: KeyRevokeRequest,
    request: Request,
    owner: OwnerPath,
    kind: KindPath,
    version: VersionPath,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("keys.operate")),
) -> KeyVersionOut:
    """Revoke a version (for example after a suspected compromise); every later use is rejected."""
    return revoke_key(request, session, caller, owner, kind, version, body.reason)


@router.post("/keys/{owner}/{kind}/versions/{version}/destroy", response_model=KeyVersionOut)
def keys_destroy(
    body: KeyDestroyRequest,
    request: Request,
    owner: OwnerPath,
    kind: KindPath,
    version: VersionPath,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("keys.operate")),
) -> KeyVersionOut:
    """Erase a version's key material; ``confirm`` must be ``<owner>/<kind>/v<version>``."""
    return destroy_key(request, session, caller, owner, kind, version, body.confirm)
