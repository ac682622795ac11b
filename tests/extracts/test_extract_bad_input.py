"""Bad input to the extract builder: each case gives a Chinese message and leaves the published build in place."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from extracts.builder import (
    ExtractColumnUnclassified,
    ExtractDirNotWritable,
    ExtractKeyMissingError,
    ExtractOutcome,
    build_institution,
    extract_dir,
)
from extracts.policy import DEFAULT_POLICY_FILE, POLICY_SIGNATURE_KIND, PolicyInvalid, approved_path
from extracts.publish import builds_dir
from regsandbox_core.files import make_private_dirs
from regsandbox_core.settings import Settings
from regsandbox_core.signing import sign_file
from tests.extracts.test_masked_intake import CLASSES, CUSTOMERS, warehouse  # noqa: F401 - fixture


def _assert_previous_kept(settings: Settings, code: str, first: ExtractOutcome) -> None:
    """The first build is still published and no other build folder is left behind."""
    assert os.path.realpath(extract_dir(settings, code)) == str(first.folder)
    assert sorted(path.name for path in builds_dir(settings, code).iterdir()) == [first.build_id]
    assert not list(settings.warehouse_dir.glob(".extract-work-*"))


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """Make ``folder`` refuse new entries: the immutable attribute as root (root ignores modes), else mode 0500."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], check=True, timeout=30)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True, timeout=30)
    else:
        mode = folder.stat().st_mode
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(mode)


def test_column_without_any_class_rejected(warehouse) -> None:  # noqa: F811
    settings, _store, _raw = warehouse
    first = build_institution(settings, "bank_a", classes=CLASSES)
    without = {key: value for key, value in CLASSES.items() if key not in ((CUSTOMERS, "BZ"), (CUSTOMERS, "DZ"))}

    with pytest.raises(ExtractColumnUnclassified) as caught:
        build_institution(settings, "bank_a", classes=without)

    error = caught.value
    assert error.code == "EXTRACT_COLUMN_UNCLASSIFIED"
    assert f"表 {CUSTOMERS} 的字段 DZ、BZ" in error.message
    assert "catalog-sync" in error.message
    assert "原有提取保持不变" in error.message
    _assert_previous_kept(settings, "bank_a", first)


def test_no_classes_at_all_rejected(warehouse) -> None:  # noqa: F811
    settings, _store, _raw = warehouse
    with pytest.raises(ExtractColumnUnclassified) as caught:
        build_institution(settings, "bank_c")
    assert "表 TEST_DKXX 的字段 HTH、ZJHM、DKJE、YE、CJRQ" in caught.value.message
    assert not extract_dir(settings, "bank_c").exists()
    assert list(builds_dir(settings, "bank_c").iterdir()) == []


def test_missing_token_key_keeps_previous(warehouse) -> None:  # noqa: F811
    settings, store, _raw = warehouse
    first = build_institution(settings, "bank_b", classes=CLASSES)
    store.revoke("bank_b", "token", 1, "test")

    with pytest.raises(ExtractKeyMissingError) as caught:
        build_institution(settings, "bank_b", classes=CLASSES)

    assert caught.value.code == "EXTRACT_KEY_MISSING"
    assert "令牌化密钥" in caught.value.message
    assert "原有提取保持不变" in caught.value.message
    _assert_previous_kept(settings, "bank_b", first)


def test_unwritable_builds_folder_keeps_previous(warehouse) -> None:  # noqa: F811
    settings, _store, _raw = warehouse
    first = build_institution(settings, "bank_a", classes=CLASSES)
    changed = {**CLASSES, (CUSTOMERS, "BZ"): CLASSES[(CUSTOMERS, "CJRQ")]}

    with _read_only(builds_dir(settings, "bank_a")), pytest.raises(ExtractDirNotWritable) as caught:
        build_institution(settings, "bank_a", classes=changed)

    error = caught.value
    assert error.code == "EXTRACT_DIR_NOT_WRITABLE"
    assert str(builds_dir(settings, "bank_a")) in error.message
    assert "写权限" in error.message
    _assert_previous_kept(settings, "bank_a", first)


def test_signed_policy_keeping_c3_rejected(warehouse) -> None:  # noqa: F811
    """A policy file that keeps C3 is refused at build time even when someone signed it outside the approval."""
    settings, store, _raw = warehouse
    first = build_institution(settings, "bank_a", classes=CLASSES)
    document = yaml.safe_load(DEFAULT_POLICY_FILE.read_text("utf-8"))
    document["version"] = 2
    next(rule for rule in document["rules"] if rule["id"] == "drop-c3")["treatment"] = "keep"
    path = approved_path(settings, 2)
    make_private_dirs(path.parent, settings.data_dir)
    path.write_text(yaml.safe_dump(document, allow_unicode=True, sort_keys=False), encoding="utf-8")
    sign_file(store, path, kind=POLICY_SIGNATURE_KIND)

    with pytest.raises(PolicyInvalid) as caught:
        build_institution(settings, "bank_a", classes=CLASSES)

    assert caught.value.code == "POLICY_C3_NOT_DROPPED"
    assert "drop-c3" in caught.value.message
    _assert_previous_kept(settings, "bank_a", first)
