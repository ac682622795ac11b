"""Admin service of regsandbox: users, institutions, model review, report scheduling and the audit log.

Run it with ``uvicorn admin_api.app:create_server_app --factory``; prepare its database with
``python -m admin_api.manage migrate`` and the demo data with ``python -m admin_api.manage seed-demo``.
"""
