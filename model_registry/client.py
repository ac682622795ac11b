"""Administration client of the MLflow tracking server: users, grants, experiments, model versions.

Talks to MLflow's REST API over httpx with HTTP basic auth, normally as the auth app's ``admin``
user. admin_api uses :class:`MlflowAdmin` with :meth:`MlflowAdmin.list_model_versions` and
:meth:`MlflowAdmin.set_model_version_tags`; the permission sync uses the rest.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx

from regsandbox_core.errors import RegsandboxError

log = logging.getLogger(__name__)

PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE")
RESOURCE_EXPERIMENT = "experiment"
RESOURCE_REGISTERED_MODEL = "registered_model"

_PAGE_SIZE = 1000
_LOOK_UP = object()


class RegistryUnavailable(RegsandboxError):
    """The MLflow server could not be reached, timed out or returned HTTP 502, 503 or 504."""

    status = 503

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            "REGISTRY_UNAVAILABLE",
            f"模型登记服务（MLflow）暂时无法访问：{url}（{reason}）。请稍后重试；如持续出现，请系统管理员检查 MLflow 服务是否已启动。",
        )


class RegistryRequestFailed(RegsandboxError):
    """MLflow rejected a request; ``error_code`` and ``http_status`` are MLflow's own."""

    status = 502

    def __init__(self, method: str, path: str, http_status: int, error_code: str, detail: str) -> None:
        super().__init__(
            "REGISTRY_REQUEST_FAILED",
            f"模型登记服务（MLflow）拒绝了请求 {method} {path}：HTTP {http_status} {error_code}。请系统管理员查看 MLflow 日志。",
        )
        self.http_status = http_status
        self.error_code = error_code
        self.detail = detail


class MlflowAdmin:
    """Client of one MLflow tracking server, authenticated with HTTP basic auth.

    Every method raises :class:`RegistryUnavailable` when the server cannot be reached and
    :class:`RegistryRequestFailed` when it rejects a request in a way the method does not handle.
    """

    def __init__(self, tracking_url: str, username: str, password: str, timeout: float = 10) -> None:
        self.tracking_url = tracking_url.rstrip("/")
        self._http = httpx.Client(base_url=self.tracking_url, auth=(username, password), timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> MlflowAdmin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Transport

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: dict[str, Any] | None = None,
        accept_errors: tuple[str, ...] = (),
    ) -> dict[str, Any] | None:
        """Send one request; return the JSON body, or None when MLflow returns one of the ``accept_errors`` codes."""
        try:
            response = self._http.request(method, path, params=params, json=json)
        except httpx.HTTPError as error:
            raise RegistryUnavailable(self.tracking_url, type(error).__name__) from error
        if response.status_code in (502, 503, 504):
            raise RegistryUnavailable(self.tracking_url, f"HTTP {response.status_code}")
        if response.is_success:
            return response.json() if response.content else {}

        error_code = _error_code(response)
        if error_code in accept_errors:
            return None
        log.warning("MLflow rejected %s %s: HTTP %d %s", method, path, response.status_code, error_code)
        raise RegistryRequestFailed(method, path, response.status_code, error_code, response.text[:500])

    def _paged(self, path: str, key: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Collect every item of a search endpoint that pages with ``page_token``."""
        items: list[dict[str, Any]] = []
        page_token: str | None = None
        while True:
            query = {**params, "max_results": _PAGE_SIZE}
            if page_token:
                query["page_token"] = page_token
            body = self._request("GET", path, params=query) or {}
            items.extend(body.get(key, []))
            page_token = body.get("next_page_token")
            if not page_token:
                return items

    # Users

    def list_users(self) -> list[dict[str, Any]]:
        """Return every MLflow user as ``{id, username, is_admin, ...}``."""
        body = self._request("GET", "/api/2.0/mlflow/users/list") or {}
        return list(body.get("users", []))

    def create_user(self, username: str, password: str) -> bool:
        """Create a user, or set the password of an existing one. Returns True when it was created."""
        created = self._request(
            "POST",
            "/api/2.0/mlflow/users/create",
            json={"username": username, "password": password},
            accept_errors=("RESOURCE_ALREADY_EXISTS",),
        )
        if created is not None:
            return True
        self._request(
            "PATCH", "/api/2.0/mlflow/users/update-password", json={"username": username, "password": password}
        )
        return False

    def delete_user(self, username: str) -> bool:
        """Delete a user and every grant it holds. Returns False when there was no such user."""
        deleted = self._request(
            "DELETE",
            "/api/2.0/mlflow/users/delete",
            json={"username": username},
            accept_errors=("RESOURCE_DOES_NOT_EXIST",),
        )
        return deleted is not None

    # Grants

    def list_user_permissions(self, username: str) -> list[dict[str, Any]]:
        """Return the user's grants as ``{resource_type, resource_pattern, permission, ...}`` rows."""
        body = self._request("GET", "/api/3.0/mlflow/users/permissions/list", params={"username": username}) or {}
        return list(body.get("permissions", []))

    def grant(
        self,
        username: str,
        resource_type: str,
        resource_id: str,
        permission: str,
        *,
        current: str | None | object = _LOOK_UP,
    ) -> bool:
        """Make ``permission`` the user's grant on the resource. Returns True when a grant changed.

        ``current`` is the grant the caller already knows the user holds (None for none); by
        default it is looked up, which costs one request.
        """
        if permission not in PERMISSIONS:
            raise ValueError(f"permission must be one of {PERMISSIONS}, not {permission!r}")
        if current is _LOOK_UP:
            current = self._current_grant(username, resource_type, resource_id)
        if current == permission:
            return False
        if current is not None:
            self._revoke(username, resource_type, resource_id)
        self._request(
            "POST",
            "/api/3.0/mlflow/users/permissions/grant",
            json={
                "username": username,
                "resource_type": resource_type,
                "resource_id": resource_id,
                "permission": permission,
            },
        )
        return True

    def _current_grant(self, username: str, resource_type: str, resource_id: str) -> str | None:
        for row in self.list_user_permissions(username):
            if row.get("resource_type") == resource_type and row.get("resource_pattern") == resource_id:
                return str(row.get("permission"))
        return None

    def _revoke(self, username: str, resource_type: str, resource_id: str) -> bool:
        revoked = self._request(
            "POST",
            "/api/3.0/mlflow/users/permissions/revoke",
            json={"username": username, "resource_type": resource_type, "resource_id": resource_id},
            accept_errors=("RESOURCE_DOES_NOT_EXIST",),
        )
        return revoked is not None

    def grant_experiment(self, username: str, experiment_id: str, permission: str) -> bool:
        """Create or update the user's grant on an experiment. Returns True when it changed."""
        return self.grant(username, RESOURCE_EXPERIMENT, str(experiment_id), permission)

    def grant_registered_model(self, username: str, name: str, permission: str) -> bool:
        """Create or update the user's grant on a registered model. Returns True when it changed."""
        return self.grant(username, RESOURCE_REGISTERED_MODEL, name, permission)

    def revoke_experiment(self, username: str, experiment_id: str) -> bool:
        """Remove the user's grant on an experiment. Returns False when there was none."""
        return self._revoke(username, RESOURCE_EXPERIMENT, str(experiment_id))

    def revoke_registered_model(self, username: str, name: str) -> bool:
        """Remove the user's grant on a registered model. Returns False when there was none."""
        return self._revoke(username, RESOURCE_REGISTERED_MODEL, name)

    # Experiments and registered models

    def list_experiments(self) -> list[dict[str, Any]]:
        """Return every experiment, deleted ones included, as ``{experiment_id, name, lifecycle_stage, ...}``."""
        return self._paged("/api/2.0/mlflow/experiments/search", "experiments", {"view_type": "ALL"})

    def get_or_create_experiment(self, name: str) -> str:
        """Return the id of the experiment called ``name``, creating it (or restoring it if deleted)."""
        body = self._request(
            "GET",
            "/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": name},
            accept_errors=("RESOURCE_DOES_NOT_EXIST",),
        )
        if body is not None:
            experiment = body["experiment"]
            if experiment.get("lifecycle_stage") == "deleted":
                self._request(
                    "POST", "/api/2.0/mlflow/experiments/restore", json={"experiment_id": experiment["experiment_id"]}
                )
            return str(experiment["experiment_id"])
        created = self._request("POST", "/api/2.0/mlflow/experiments/create", json={"name": name}) or {}
        log.info("created MLflow experiment %r (id %s)", name, created.get("experiment_id"))
        return str(created["experiment_id"])

    def list_registered_models(self) -> list[dict[str, Any]]:
        """Return every registered model as ``{name, creation_timestamp, tags, ...}``."""
        return self._paged("/api/2.0/mlflow/registered-models/search", "registered_models", {})

    # Model versions

    def list_model_versions(self) -> list[dict[str, Any]]:
        """Return every model version with the metrics of the run that produced it.

        Each item is ``{name, version, run_id, creation_timestamp, status, tags: dict,
        metrics: dict}``; ``metrics`` holds the run's latest value of each metric (for example
        ``auc`` and ``ks``) and is empty when the version has no run or the run is gone.
        """
        versions = self._paged("/api/2.0/mlflow/model-versions/search", "model_versions", {})
        metrics_by_run: dict[str, dict[str, float]] = {}
        result = []
        for version in versions:
            run_id = version.get("run_id") or ""
            if run_id and run_id not in metrics_by_run:
                metrics_by_run[run_id] = self._run_metrics(run_id)
            result.append(
                {
                    "name": version["name"],
                    "version": str(version["version"]),
                    "run_id": run_id or None,
                    "creation_timestamp": int(version.get("creation_timestamp", 0)),
                    "status": version.get("status"),
                    "tags": {tag["key"]: tag.get("value", "") for tag in version.get("tags", [])},
                    "metrics": dict(metrics_by_run.get(run_id, {})),
                }
            )
        return result

    def _run_metrics(self, run_id: str) -> dict[str, float]:
        body = self._request(
            "GET", "/api/2.0/mlflow/runs/get", params={"run_id": run_id}, accept_errors=("RESOURCE_DOES_NOT_EXIST",)
        )
        if body is None:
            return {}
        metrics = body.get("run", {}).get("data", {}).get("metrics", [])
        return {metric["key"]: float(metric["value"]) for metric in metrics}

    def set_model_version_tags(self, name: str, version: str | int, tags: dict[str, str]) -> None:
        """Set (create or overwrite) tags on one model version."""
        for key, value in tags.items():
            self._request(
                "POST",
                "/api/2.0/mlflow/model-versions/set-tag",
                json={"name": name, "version": str(version), "key": key, "value": str(value)},
            )


def _error_code(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP_{response.status_code}"
    if isinstance(body, dict) and body.get("error_code"):
        return str(body["error_code"])
    return f"HTTP_{response.status_code}"
