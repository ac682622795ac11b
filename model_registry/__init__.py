"""MLflow tracking server with its basic-auth app, its administration client and the permission sync.

- :mod:`model_registry.server`: ``prepare_server`` and ``python -m model_registry.server``.
- :mod:`model_registry.client`: ``MlflowAdmin``, the REST client used by admin_api and the sync.
- :mod:`model_registry.sync`: ``sync_permissions`` and ``python -m model_registry.sync``.
"""
