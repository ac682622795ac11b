"""UserSync rounds with an in-memory hub and directory: what one round does with the directory's mapping.

The directory itself is tested against the real admin_api in tests/core/test_admin_users_directory.py,
and the sync with a real hub and the real admin_api in test_hub_real_admin_api.py.
"""

from __future__ import annotations

from typing import Any

from hub_config.user_sync import UserSync
from regsandbox_core.admin_users import UserDirectory

SPAWN_ROLES = frozenset({"modeller"})
UNREACHABLE = "http://127.0.0.1:9"
"""admin_api address of these tests: audit events fail to send, which the sync logs and goes on."""


class MemoryHub:
    """Fake HubApi that makes a round's calls on hub users kept in a dict."""

    def __init__(self, users: dict[str, dict[str, Any]]) -> None:
        self.users = users
        self.deleted: list[str] = []

    def list_users(self) -> list[dict[str, Any]]:
        return list(self.users.values())

    def get_user(self, name: str) -> dict[str, Any] | None:
        return self.users.get(name)

    def stop_server(self, name: str) -> bool:
        self.users[name]["servers"] = {}
        return True

    def delete_user(self, name: str) -> None:
        self.users.pop(name, None)
        self.deleted.append(name)

    def add_to_group(self, group: str, name: str) -> None:
        self.users[name]["groups"] = sorted({*self.users[name]["groups"], group})

    def remove_from_group(self, group: str, name: str) -> None:
        self.users[name]["groups"] = [item for item in self.users[name]["groups"] if item != group]

    def set_auth_state(self, name: str, auth_state: dict[str, Any]) -> None:
        self.users[name]["auth_state"] = auth_state


class ListedDirectory:
    """A directory that returns the mappings the test gives, one per refresh, and counts the refreshes."""

    def __init__(self, *mappings: dict[str, dict[str, Any]]) -> None:
        self.mappings = list(mappings)
        self.refreshes = 0

    def refresh(self) -> dict[str, dict[str, Any]]:
        self.refreshes += 1
        return dict(self.mappings.pop(0))


def hub_user(name: str, group: str = "bank_a") -> dict[str, Any]:
    return {"name": name, "groups": [group], "servers": {}, "admin": False}


def account(name: str, active: bool = True, institution_code: str = "bank_a") -> dict[str, Any]:
    return {"username": name, "display_name": name, "role": "modeller", "institution_code": institution_code,
            "is_active": active, "email": f"{name}@bank-a.example"}


def test_sync_uses_user_directory() -> None:
    sync = UserSync(MemoryHub({}), UNREACHABLE, "token", SPAWN_ROLES)

    assert isinstance(sync.directory, UserDirectory)
    assert sync.directory.service == "hub"


def test_empty_mapping_removes_no_hub_user() -> None:
    hub = MemoryHub({"alice": hub_user("alice"), "bob": hub_user("bob")})
    sync = UserSync(hub, UNREACHABLE, "token", SPAWN_ROLES, timeout=1, directory=ListedDirectory({}))

    report = sync.run_round()

    assert hub.deleted == []
    assert sorted(report.errors) == ["alice", "bob"]


def test_round_applies_directory_changes() -> None:
    first = {"alice": account("alice"), "bob": account("bob"), "carol": account("carol")}
    second = {**first, "bob": account("bob", active=False), "carol": account("carol", institution_code="bank_b")}
    directory = ListedDirectory(first, second)
    hub = MemoryHub({name: hub_user(name) for name in ("alice", "bob", "carol", "ghost")})
    sync = UserSync(hub, UNREACHABLE, "token", SPAWN_ROLES, timeout=1, directory=directory)

    opening = sync.run_round()
    following = sync.run_round()

    assert opening.removed == ["ghost"]  # no longer in admin_api
    assert following.removed == ["bob"]
    assert following.regrouped == ["carol"]
    assert following.auth_state_updated == ["carol"]
    assert hub.users["carol"]["groups"] == ["bank_b"]
    assert sorted(hub.users) == ["alice", "carol"]
    assert directory.refreshes == 2
