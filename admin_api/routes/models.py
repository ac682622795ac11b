"""Registered model versions in MLflow and their review by the regulator."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy.orm import Session

from admin_api.deps import deny, get_session, require
from admin_api.errors import forbidden, not_found
from admin_api.models import ModelReview
from admin_api.schemas import ReviewOut, ReviewRequest
from admin_api.security import Principal
from admin_api.roles import is_cross_institution
from admin_api.services import list_models, review_model, visible_models
from admin_api.signatures import request_trusted_keys, review_signature, signature_download

router = APIRouter()


@router.get("/models")
def models(
    request: Request, session: Session = Depends(get_session), caller: Principal = Depends(require("models.read"))
) -> list[dict[str, Any]]:
    """List registered model versions with institution, AUC/KS and review status.

    Regulators get every institution's versions. A modeller gets the versions of their own institution only.
    A reviewed version carries ``review_id`` and the ``signature`` summary of its newest review.
    """
    return visible_models(list_models(session, request.app.state.registry, request_trusted_keys(request)), caller)


@router.post("/models/{name}/versions/{version}/review", response_model=ReviewOut)
def review(
    name: str,
    version: str,
    body: ReviewRequest,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("models.review")),
) -> ReviewOut:
    """Approve or return a model version; signed, stored, audited and written to MLflow tags."""
    decision = review_model(
        session, request, caller, request.app.state.registry, name, version, body.decision, body.comment
    )
    return ReviewOut(
        id=decision.id, model_name=decision.model_name, model_version=decision.model_version,
        institution_code=decision.institution_code, decision=decision.decision, comment=decision.comment,
        reviewer=decision.reviewer, decided_at=decision.decided_at,
        signature=review_signature(decision, request_trusted_keys(request)),
    )


@router.get("/model-reviews/{review_id}/signature", response_class=Response)
def review_signature_file(
    review_id: int,
    request: Request,
    session: Session = Depends(get_session),
    caller: Principal = Depends(require("models.read")),
) -> Response:
    """Download the SM2-signed envelope of a review decision, for ``regsandbox verify``.

    The same institution rule as reading models applies: regulators read every review, a modeller
    only the reviews of their own institution's models.
    """
    review = session.get(ModelReview, review_id)
    if review is None:
        raise not_found("REVIEW_NOT_FOUND", f"审查记录 {review_id} 不存在，请从模型列表的 review_id 取得编号。")
    own = caller.institution_code
    if not is_cross_institution(caller) and (own is None or review.institution_code != own):
        raise deny(request, caller, "models.read", forbidden(
            "INSTITUTION_FORBIDDEN",
            f"审查记录 {review_id} 不属于本机构（{own or '无机构'}）的模型，无权下载其签名。",
        ))
    if review.signature is None:
        raise not_found(
            "SIGNATURE_NOT_FOUND", f"审查记录 {review_id} 在启用签名之前保存，没有签名；如需签名，请重新审查该模型版本。"
        )
    return signature_download(review.signature, f"model-review-{review.id}.json")
