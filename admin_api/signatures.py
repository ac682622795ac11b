"""SM2 signatures of model review decisions and report notebook approvals (non-repudiation).

Each decision is signed with the platform's active signing key (:func:`regsandbox_core.signing.sign_object`)
and the JSON envelope is stored in the row's ``signature`` column. The payloads are:

- ``model_review``: ``{review_id, model_name, model_version, institution_code, decision, comment,
  reviewer, decided_at}``;
- ``notebook_approval``: ``{notebook_id, name, path, sm3_digest, approved_by, approved_at}``.

Times are ISO 8601 in UTC. A signature summary is valid only when the envelope verifies against
the key store's public keys and its payload equals the payload rebuilt from the row, so an
edited signature column and an edited decision column both show ``valid: false``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from admin_api.errors import ApiError
from admin_api.keyaccess import request_keystore
from admin_api.models import ModelReview, ReportNotebook
from regsandbox_core.errors import RegsandboxError
from regsandbox_core.keystore import KIND_SIGNING, STATE_ACTIVE, STATE_DECRYPT_ONLY, STATE_DESTROYED, KeyStore
from regsandbox_core.signing import SignatureInvalid, TrustedKeys, sign_object, verify_object

logger = logging.getLogger(__name__)

KIND_REVIEW = "model_review"
KIND_APPROVAL = "notebook_approval"
SIGNING_FAILED = "SIGNING_FAILED"

# States whose public key KeyStore.public_key returns: revoked and pending keys verify nothing.
_VERIFYING_STATES = frozenset({STATE_ACTIVE, STATE_DECRYPT_ONLY, STATE_DESTROYED})


class SigningFailed(ApiError):
    """The key store could not sign a decision, so the decision was not stored."""

    status = 503
    audited = False
    """Set once the failure is in the audit log, so a caller that audits rejected forms skips it."""


def _iso(value: datetime | None) -> str | None:
    return value.astimezone(UTC).isoformat() if value is not None else None


def review_payload(review: ModelReview) -> dict[str, Any]:
    """Return the signed content of a review decision; ``review.id`` must be assigned (flushed)."""
    return {
        "review_id": review.id,
        "model_name": review.model_name,
        "model_version": review.model_version,
        "institution_code": review.institution_code,
        "decision": review.decision,
        "comment": review.comment,
        "reviewer": review.reviewer,
        "decided_at": _iso(review.decided_at),
    }


def approval_payload(notebook: ReportNotebook) -> dict[str, Any]:
    """Return the signed content of a notebook's current approval."""
    return {
        "notebook_id": notebook.id,
        "name": notebook.name,
        "path": notebook.path,
        "sm3_digest": notebook.sm3_digest,
        "approved_by": notebook.approved_by,
        "approved_at": _iso(notebook.approved_at),
    }


def check_signing_key(keystore: KeyStore, subject: str) -> None:
    """Raise SIGNING_FAILED (503) now when the platform has no usable signing key.

    Callers check this before a side effect outside the database (the MLflow tags of a review),
    so a revoked key stops the decision before anything is written anywhere.
    """
    try:
        keystore.current("platform", KIND_SIGNING)
    except RegsandboxError as error:
        raise _signing_failed(subject, error) from None


def sign_decision(keystore: KeyStore, kind: str, payload: dict[str, Any], subject: str) -> str:
    """Sign ``payload`` with the platform signing key and return the envelope as JSON text.

    Raises :class:`SigningFailed` (SIGNING_FAILED, 503) when the key store cannot
    sign, for example because the platform signing key was revoked.
    """
    try:
        envelope = sign_object(keystore, kind, payload)
    except RegsandboxError as error:
        raise _signing_failed(subject, error) from None
    return json.dumps(envelope, ensure_ascii=False, sort_keys=True)


def _signing_failed(subject: str, error: RegsandboxError) -> SigningFailed:
    logger.error("signing %s failed: %s", subject, error.code)
    return SigningFailed(
        SIGNING_FAILED,
        f"无法用平台签名密钥为{subject}签名，该结论未保存：{error.message}（{error.code}）"
        "请联系密钥管理员启用可用的平台签名密钥（platform/signing）后重试。",
    )


def trusted_public_keys(keystore: KeyStore) -> dict[str, bytes]:
    """Return ``{label: public key}`` of every platform signing version that may verify signatures.

    One read of the key store serves a whole page of summaries. Revoked and pending versions are
    left out, as :meth:`KeyStore.public_key` rejects them.
    """
    trusted: dict[str, bytes] = {}
    for entry in keystore.metadata()["keys"]:
        if entry["kind"] == KIND_SIGNING and entry["state"] in _VERIFYING_STATES and entry.get("public_key"):
            trusted[f"{entry['owner']}/{KIND_SIGNING}/v{entry['version']}"] = bytes.fromhex(entry["public_key"])
    return trusted


def request_trusted_keys(request: Request) -> dict[str, bytes]:
    """Return :func:`trusted_public_keys` of the platform key store, or an empty mapping when it is unreadable.

    With an empty mapping every summary reads ``valid: false``; the cause is logged.
    """
    try:
        return trusted_public_keys(request_keystore(request))
    except RegsandboxError as error:
        logger.warning("signature summaries cannot be verified, key store unreadable: %s", error.code)
        return {}


def signature_summary(
    stored: str | None, kind: str, expected_payload: dict[str, Any], trusted: TrustedKeys | Mapping[str, bytes]
) -> dict[str, Any] | None:
    """Return ``{key, signed_at, valid}`` of a stored envelope, or None when the row has no signature.

    ``valid`` is true only when the envelope verifies against ``trusted``, its kind is ``kind``
    and its payload equals ``expected_payload``.
    """
    if stored is None:
        return None
    try:
        envelope = json.loads(stored)
    except ValueError:
        return {"key": None, "signed_at": None, "valid": False}
    signature = envelope.get("signature") if isinstance(envelope, dict) else None
    key = signature.get("key") if isinstance(signature, dict) else None
    signed_at = signature.get("signed_at") if isinstance(signature, dict) else None
    try:
        verified = verify_object(envelope, trusted)
    except SignatureInvalid:
        valid = False
    else:
        valid = verified.kind == kind and verified.payload == json.loads(json.dumps(expected_payload))
    return {
        "key": key if isinstance(key, str) else None,
        "signed_at": signed_at if isinstance(signed_at, str) else None,
        "valid": valid,
    }


def review_signature(review: ModelReview, trusted: TrustedKeys | Mapping[str, bytes]) -> dict[str, Any] | None:
    return signature_summary(review.signature, KIND_REVIEW, review_payload(review), trusted)


def approval_signature(notebook: ReportNotebook, trusted: TrustedKeys | Mapping[str, bytes]) -> dict[str, Any] | None:
    """Return the summary of a notebook's approval signature; None unless the notebook is approved and signed."""
    if notebook.status != "approved":
        return None
    return signature_summary(notebook.signature, KIND_APPROVAL, approval_payload(notebook), trusted)


def signature_download(stored: str, filename: str) -> Response:
    """Return a stored envelope unchanged as a JSON file download."""
    return Response(
        content=stored.encode("utf-8"),
        media_type="application/json",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
