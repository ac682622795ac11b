"""Registered model versions in MLflow and their review by the regulator."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from sqlalchemy.orm import Session

from admin_api.deps import get_session, require
from admin_api.schemas import ReviewOut, ReviewRequest
from admin_api.security import Principal
from admin_api.services import list_models, review_model, visible_models

router = APIRouter()


@router.get("/models")
def models(
    request: Request, session: Session = Depends(get_session), caller: Principal = Depends(require("models.read"))
) -> list[dict[str, Any]]:
    """List registered model versions with institution, AUC/KS and review status.

    Regulators get every institution's versions. A modeller gets the versions of their own institution only.
    """
    return visible_models(list_models(session, request.app.state.registry), caller)


@router.post("/models/{name}/versions/{version}/review", response_model=ReviewOut)
def review(
    name: str,
    version: str,
    body: ReviewRequest,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("models.review")),
) -> ReviewOut:
    """Approve or return a model version; stored, audited and written to MLflow tags."""
    decision = review_model(
        session, request, caller, request.app.state.registry, name, version, body.decision, body.comment
    )
    return ReviewOut.model_validate(decision, from_attributes=True)
