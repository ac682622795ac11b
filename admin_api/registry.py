"""Adapter between admin_api and the MLflow model registry.

The app keeps one object with the :class:`ModelRegistry` methods in ``app.state.registry``.
By default it is :class:`MlflowRegistry`, which imports ``model_registry.client.MlflowAdmin``
only when first used, so admin_api starts without that package. The client's own
RegsandboxError (503 ``REGISTRY_UNAVAILABLE``, 502 ``REGISTRY_REQUEST_FAILED``) passes through;
any other failure becomes :class:`RegistryUnavailable` (503 ``REGISTRY_UNAVAILABLE``).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from regsandbox_core.errors import RegsandboxError

logger = logging.getLogger(__name__)

REVIEW_TAG_PREFIX = "regsandbox.review."
MLFLOW_ADMIN_USER = "admin"


class RegistryUnavailable(RegsandboxError):
    status = 503

    def __init__(self) -> None:
        super().__init__("REGISTRY_UNAVAILABLE", "模型注册中心（MLflow）暂时无法访问，本次操作未保存，请稍后重试。")


class ModelRegistry(Protocol):
    def list_model_versions(self) -> list[dict[str, Any]]:
        """Return every registered model version as {name, version, run_id, creation_timestamp, tags, metrics}."""
        ...

    def set_model_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        """Set ``tags`` on one model version."""
        ...


class MlflowRegistry:
    """ModelRegistry backed by ``model_registry.client.MlflowAdmin`` as the MLflow ``admin`` user."""

    def __init__(self, tracking_url: str, password: str) -> None:
        self._tracking_url = tracking_url
        self._password = password
        self._admin: Any = None

    def _client(self) -> Any:
        if self._admin is None:
            try:
                from model_registry.client import MlflowAdmin
            except ImportError as error:
                logger.error("model_registry.client is not importable: %s", error)
                raise RegistryUnavailable() from error
            self._admin = MlflowAdmin(self._tracking_url, MLFLOW_ADMIN_USER, self._password)
        return self._admin

    def list_model_versions(self) -> list[dict[str, Any]]:
        client = self._client()
        try:
            return list(client.list_model_versions())
        except RegsandboxError:
            raise
        # Other exceptions are not part of the client's interface, so they count as unreachable.
        except Exception as error:
            logger.warning("listing model versions at %s failed: %s", self._tracking_url, error)
            raise RegistryUnavailable() from error

    def set_model_version_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        client = self._client()
        try:
            client.set_model_version_tags(name, version, tags)
        except RegsandboxError:
            raise
        except Exception as error:
            logger.warning("tagging model %s version %s at %s failed: %s", name, version, self._tracking_url, error)
            raise RegistryUnavailable() from error


def call_registry(method: Any, *args: Any) -> Any:
    """Call a method of an injected registry, turning unexpected failures into RegistryUnavailable."""
    try:
        return method(*args)
    except RegsandboxError:
        raise
    except Exception as error:
        logger.warning("model registry call %s failed: %s", getattr(method, "__name__", method), error)
        raise RegistryUnavailable() from error
