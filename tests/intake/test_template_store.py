"""The template store: shipped and added versions in one catalog, unloadable files, reload callbacks, removal checks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from intake import template_store
from intake.template_model import SHARED_CODE_LISTS_FILE, TEMPLATES_DIR, TemplateCatalog, TemplateError

CUSTOMERS = (TEMPLATES_DIR / "EAST_DGKHXXB.v1.yaml").read_text(encoding="utf-8")
CONTRACTS = (TEMPLATES_DIR / "EAST_XDHTB.v1.yaml").read_text(encoding="utf-8")


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A folder of added versions for this test; afterwards the process uses the folder it used before."""
    previous = template_store.configured_folder()
    added = tmp_path / "data" / "templates"
    template_store.configure(added)
    try:
        yield added
    finally:
        template_store.configure(previous)


def customers(code: str) -> str:
    return CUSTOMERS.replace("code: EAST_DGKHXXB", f"code: {code}", 1)


def contracts_pinned_to(code: str, target: str) -> str:
    """Return the contract table as ``code`` whose reference rule looks up version 1 of ``target``."""
    text = CONTRACTS.replace("code: EAST_XDHTB", f"code: {code}", 1)
    return text.replace("template: EAST_DGKHXXB,", f"template: {target}, version: 1,", 1)


def test_folder_created_private(folder: Path) -> None:
    assert folder.is_dir()
    assert folder.stat().st_mode & 0o777 == 0o700


def test_added_versions_refer_to_each_other(folder: Path) -> None:
    # ZA_HT sorts first and refers to ZB_KH, so it is admitted in the second pass.
    (folder / "ZA_HT.v1.yaml").write_text(contracts_pinned_to("ZA_HT", "ZB_KH"), encoding="utf-8")
    (folder / "ZB_KH.v1.yaml").write_text(customers("ZB_KH"), encoding="utf-8")

    state = template_store.reload_catalog()

    assert state.broken == ()
    assert "ZA_HT" in state.catalog
    assert "ZB_KH" in state.catalog
    assert template_store.is_shipped(state.catalog.get("EAST_DGKHXXB"))
    assert not template_store.is_shipped(state.catalog.get("ZB_KH"))
    assert TemplateCatalog.load() is state.catalog


def test_referenced_version_not_removable(folder: Path) -> None:
    (folder / "ZA_HT.v1.yaml").write_text(contracts_pinned_to("ZA_HT", "ZB_KH"), encoding="utf-8")
    (folder / "ZB_KH.v1.yaml").write_text(customers("ZB_KH"), encoding="utf-8")
    template_store.reload_catalog()

    with pytest.raises(TemplateError) as raised:
        template_store.remove_version("ZB_KH", 1)

    assert raised.value.code == "TEMPLATE_REFERENCED"
    assert raised.value.status == 409
    assert "ZA_HT" in raised.value.message
    assert (folder / "ZB_KH.v1.yaml").exists()
    assert template_store.remove_version("ZA_HT", 1).code == "ZA_HT"
    assert template_store.remove_version("ZB_KH", 1).code == "ZB_KH"
    assert sorted(path.name for path in folder.iterdir()) == [".lock"]


def test_unloadable_files_listed(folder: Path) -> None:
    (folder / "ZC_KH.v1.yaml").write_text(customers("ZC_KH"), encoding="utf-8")
    (folder / "copy.yaml").write_text(customers("ZC_KH"), encoding="utf-8")
    (folder / "ZD_KH.v1.yml").write_text(customers("ZD_KH"), encoding="utf-8")
    (folder / SHARED_CODE_LISTS_FILE).write_bytes((TEMPLATES_DIR / SHARED_CODE_LISTS_FILE).read_bytes())
    (folder / "ZE_HT.v1.yaml").write_text(contracts_pinned_to("ZE_HT", "ZZ_MISSING"), encoding="utf-8")

    state = template_store.reload_catalog()
    broken = {item.path.name: item for item in state.broken}

    assert "ZC_KH" in state.catalog
    assert sorted(broken) == ["ZD_KH.v1.yml", "ZE_HT.v1.yaml", SHARED_CODE_LISTS_FILE, "copy.yaml"]
    assert broken["copy.yaml"].code == "TEMPLATE_DUPLICATE"  # ZC_KH.v1.yaml sorts first and is loaded
    assert ".yaml" in broken["ZD_KH.v1.yml"].message
    assert "共享代码表只随系统发布" in broken[SHARED_CODE_LISTS_FILE].message
    assert "ZZ_MISSING" in broken["ZE_HT.v1.yaml"].message
    assert all("其他模板不受影响" in item.message for item in state.broken)


def test_reload_calls_callbacks(folder: Path) -> None:
    calls: list[int] = []

    def count() -> None:
        calls.append(1)

    template_store.on_reload(count)  # stays registered, which costs the later tests one list append per reload
    template_store.add_version(customers("ZF_KH").encode("utf-8"), "新模板.yaml")

    assert len(calls) >= 1
    assert "ZF_KH" in template_store.current_catalog()
    assert (folder / "ZF_KH.v1.yaml").read_text(encoding="utf-8") == customers("ZF_KH")
