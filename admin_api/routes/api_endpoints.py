"""API参数配置: named external endpoints with encrypted credentials, and their test connection.

System administrators read and change endpoints (``api_endpoints.write``). Security administrators
may read them too (``api_endpoints.read``), to see which platform data key version protects the
stored credentials. No response contains credentials, only ``credentials_set`` and a masked hint.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from sqlalchemy.orm import Session

from admin_api.api_endpoints import (
    MAX_PAGE_SIZE,
    ConnectionTestOut,
    EndpointIn,
    EndpointOut,
    EndpointPage,
    EndpointUpdate,
    check_connection,
    create_endpoint,
    delete_endpoint,
    get_endpoint,
    list_endpoints,
    update_endpoint,
)
from admin_api.deps import get_session, require
from admin_api.security import Principal

router = APIRouter()

NamePath = Annotated[str, Path(max_length=64, description="接口标识")]


@router.get("/api-endpoints", response_model=EndpointPage)
def endpoints_list(
    session: Session = Depends(get_session),
    _caller: Principal = Depends(require("api_endpoints.read")),
    offset: int = Query(default=0, ge=0),
    limit: int = Query(default=50, ge=1, le=MAX_PAGE_SIZE),
) -> EndpointPage:
    """List endpoints by name, one page at a time."""
    return list_endpoints(session, offset, limit)


@router.get("/api-endpoints/{name}", response_model=EndpointOut)
def endpoints_get(name: NamePath, session: Session = Depends(get_session),
                  _caller: Principal = Depends(require("api_endpoints.read"))) -> EndpointOut:
    return EndpointOut.of(get_endpoint(session, name))


@router.post("/api-endpoints", response_model=EndpointOut, status_code=201)
def endpoints_create(body: EndpointIn, request: Request, session: Session = Depends(get_session),
                     caller: Principal = Depends(require("api_endpoints.write"))) -> EndpointOut:
    """Create an endpoint; its credentials are encrypted under the active platform data key."""
    return EndpointOut.of(create_endpoint(session, request, caller, body))


@router.put("/api-endpoints/{name}", response_model=EndpointOut)
def endpoints_update(name: NamePath, body: EndpointUpdate, request: Request, session: Session = Depends(get_session),
                     caller: Principal = Depends(require("api_endpoints.write"))) -> EndpointOut:
    """Change the given fields; credentials are replaced only when ``credentials`` is supplied."""
    return EndpointOut.of(update_endpoint(session, request, caller, name, body))


@router.delete("/api-endpoints/{name}", status_code=204)
def endpoints_delete(name: NamePath, request: Request, session: Session = Depends(get_session),
                     caller: Principal = Depends(require("api_endpoints.write"))) -> Response:
    delete_endpoint(session, request, caller, name)
    return Response(status_code=204)


@router.post("/api-endpoints/{name}/test", response_model=ConnectionTestOut)
def endpoints_test(name: NamePath, request: Request, session: Session = Depends(get_session),
                   caller: Principal = Depends(require("api_endpoints.write"))) -> ConnectionTestOut:
    """Send one GET to the base URL and report the HTTP status and time, or the error in Chinese (audited)."""
    return check_connection(session, request, caller, name)
