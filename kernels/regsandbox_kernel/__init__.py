"""Helper library for notebooks in the regulatory sandbox.

Reads the institution's masked extract (folder in ``REGSANDBOX_EXTRACT_DIR``) through a locked
in-memory DuckDB and builds MLflow names with the institution prefix::

    import regsandbox_kernel as rs
    rs.tables()                                   # ['applications']
    df = rs.sql("SELECT creditability, count(*) AS n FROM applications GROUP BY 1")
    rs.mlflow_experiment("scorecard")             # 'bank_a/scorecard'

Only ``duckdb`` and ``polars`` are needed to import it. Opening an extract verifies the SM2 signature
of its manifest, which also needs ``cryptography``, ``tongsuopy`` and ``gmssl``.
"""

from regsandbox_kernel.errors import (
    ExtractNotConfiguredError,
    InvalidNameError,
    SandboxAccessError,
    UnknownTableError,
)
from regsandbox_kernel.extract import (
    connect,
    extract_dir,
    manifest,
    sql,
    table,
    tables,
    verify_extract,
    verify_manifest_signature,
    verify_tables,
)
from regsandbox_kernel.naming import current_institution, mlflow_experiment, registered_model_name

__all__ = [
    "ExtractNotConfiguredError",
    "InvalidNameError",
    "SandboxAccessError",
    "UnknownTableError",
    "connect",
    "current_institution",
    "extract_dir",
    "manifest",
    "mlflow_experiment",
    "registered_model_name",
    "sql",
    "table",
    "tables",
    "verify_extract",
    "verify_manifest_signature",
    "verify_tables",
]
