"""The packages `invoke train` gives a plain image's base Python (TRAINSTACK_BASE_PACKAGES);
the system test tests/system/test_ml_base.py runs it on a bare host."""

from __future__ import annotations

import pytest


def test_bad_package_list_is_one_line() -> None:
    from trainstack import deps
    from trainstack.errors import UsageError

    with pytest.raises(UsageError, match=r"^TRAINSTACK_BASE_PACKAGES entry '--index-url=http://x' is not a "
                                         r"package name: write names like numpy pandas, or leave it empty for none$"):
        deps.base_packages({"TRAINSTACK_BASE_PACKAGES": "numpy --index-url=http://x"})
    assert deps.base_packages({}) == ("numpy", "pandas")
    assert deps.base_packages({"TRAINSTACK_BASE_PACKAGES": ""}) == ()
    assert deps.base_packages({"TRAINSTACK_BASE_PACKAGES": "numpy==2.1.3 scipy"}) == ("numpy==2.1.3", "scipy")


TOOL = __import__("pathlib").Path(__file__).resolve().parent.parent / "bootstrap" / "tools" / "trainstack-base-env"


def run_tool(root, *packages: str):
    import subprocess

    return subprocess.run([str(TOOL), str(root), *packages], capture_output=True, text=True, timeout=60)


def test_the_tool_leaves_a_machine_with_a_venv_or_a_named_base_alone(tmp_path) -> None:
    assert run_tool(tmp_path).stdout == "kept: no packages asked for\n"
    (tmp_path / "base-python").write_text("/usr/bin/python3\n")
    assert run_tool(tmp_path, "numpy").stdout == "kept: base-python names the machine's Python\n"
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to("/usr/bin/python3")
    assert run_tool(tmp_path, "numpy").stdout == "kept: the venv exists\n"


def test_a_failed_install_leaves_no_half_base_and_names_no_base(tmp_path) -> None:
    """The next train tries again; the venv is built on the bare python3 meanwhile."""
    (tmp_path / "bin").mkdir()
    uv = tmp_path / "bin" / "uv"
    uv.write_text('#!/bin/sh\nif [ "$1" = venv ]; then mkdir -p "$5/bin"; exit 0; fi\necho "no route to pypi.org" >&2\nexit 2\n')
    uv.chmod(0o755)
    done = run_tool(tmp_path, "numpy", "pandas")
    assert done.returncode == 1
    assert done.stdout == "failed: uv could not install numpy pandas (the log above says why)\n"
    assert "no route to pypi.org" in done.stderr
    assert not (tmp_path / "base").exists()
    assert not (tmp_path / "base-python").exists()
