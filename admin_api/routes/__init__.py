"""Routers of the HTTP API (prefix ``/api/v1``), one module per resource."""
