"""Install the kernel spec "Python 3 (监管沙箱)" with an absolute interpreter path.

The checked-in ``kernels/kernelspec/regsandbox/kernel.json`` starts the kernel with ``python``,
which resolves through the PATH of the process that starts the kernel. A sandbox user's PATH
may not lead to the platform's virtual environment. Installing therefore does what
``jupyter kernelspec install kernels/kernelspec/regsandbox --sys-prefix --name regsandbox``
does and then replaces ``argv[0]`` with the absolute interpreter path (default
``<sys.prefix>/bin/python``, not resolved, so the virtual environment's packages are used).

Run ``python -m regsandbox_kernel.install [--prefix PATH] [--python PATH]``. Running it again
with the same arguments changes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

KERNEL_NAME = "regsandbox"
SOURCE_DIR = Path(__file__).resolve().parent.parent / "kernelspec" / KERNEL_NAME


def installed_dir(prefix: Path) -> Path:
    """Return ``<prefix>/share/jupyter/kernels/regsandbox``, where Jupyter looks for the spec."""
    return prefix / "share" / "jupyter" / "kernels" / KERNEL_NAME


def desired_spec(python: Path) -> dict[str, Any]:
    """Return the checked-in kernel spec with ``argv[0]`` set to ``python``."""
    spec = json.loads((SOURCE_DIR / "kernel.json").read_text(encoding="utf-8"))
    spec["argv"][0] = str(python)
    return spec


def _read_spec(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_spec(spec: dict[str, Any], path: Path) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".kernel.json.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(spec, stream, ensure_ascii=False, indent=1)
            stream.write("\n")
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def install(prefix: Path | None = None, python: Path | None = None) -> tuple[Path, bool]:
    """Install the kernel spec under ``prefix`` (default ``sys.prefix``) and return (folder, changed).

    The folder gets mode 0755 and its files 0644 so that every sandbox user can read the spec.
    Raises FileNotFoundError when ``python`` is not an executable file.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    prefix = Path(prefix or sys.prefix).absolute()
    python = Path(python or Path(sys.prefix) / "bin" / "python").absolute()
    if not (python.is_file() and os.access(python, os.X_OK)):
        raise FileNotFoundError(f"interpreter {python} is missing or not executable")

    target = installed_dir(prefix)
    spec = desired_spec(python)
    if _read_spec(target / "kernel.json") == spec:
        return target, False

    installed = Path(KernelSpecManager().install_kernel_spec(str(SOURCE_DIR), KERNEL_NAME, prefix=str(prefix)))
    _write_spec(spec, installed / "kernel.json")
    os.chmod(installed, 0o755)
    for entry in installed.iterdir():
        os.chmod(entry, 0o644 if entry.is_file() else 0o755)
    return installed, True


def main(argv: list[str] | None = None) -> int:
    """Install the kernel spec and print what was done, in Chinese for the operator."""
    parser = argparse.ArgumentParser(
        prog="python -m regsandbox_kernel.install", description="安装 Jupyter 内核“Python 3 (监管沙箱)”。"
    )
    parser.add_argument("--prefix", type=Path, help=f"安装前缀，内核写入 <前缀>/share/jupyter/kernels/{KERNEL_NAME}；默认 {sys.prefix}")
    parser.add_argument("--python", type=Path, help=f"内核使用的 Python 解释器绝对路径；默认 {Path(sys.prefix) / 'bin' / 'python'}")
    arguments = parser.parse_args(argv)
    python = arguments.python or Path(sys.prefix) / "bin" / "python"
    try:
        folder, changed = install(arguments.prefix, python)
    except FileNotFoundError:
        print(f"错误 [PYTHON_NOT_FOUND]：解释器 {python} 不存在或不可执行，请用 --python 指定虚拟环境中的 python。", file=sys.stderr)
        return 2
    except PermissionError as error:
        print(f"错误 [KERNEL_INSTALL_DENIED]：无权写入 {error.filename}，请以有写权限的用户运行或用 --prefix 指定其他位置。", file=sys.stderr)
        return 1
    if changed:
        print(f"已安装内核 {KERNEL_NAME}（Python 3 (监管沙箱)）到 {folder}。")
    else:
        print(f"内核 {KERNEL_NAME} 已是最新，无需更改：{folder}。")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
