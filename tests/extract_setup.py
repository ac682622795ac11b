"""Setup shared by the tests that build extracts."""

from __future__ import annotations

from extracts.policy import ensure_default_policy
from regsandbox_core.platform_keys import open_keystore
from regsandbox_core.settings import Settings


def approve_shipped_policy(settings: Settings) -> None:
    """Approve the shipped default masking policy, as an operator does before the first build."""
    ensure_default_policy(settings, open_keystore(settings))
