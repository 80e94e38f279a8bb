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
    """The tool on a machine whose python3 is bare (the plain image's)."""
    import subprocess

    path = image_python(root.parent / f"{root.name}-image")
    return subprocess.run([str(TOOL), str(root), *packages], capture_output=True, text=True, timeout=60,
                          env={"PATH": path})


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


def image_python(tmp_path, *dists: str):
    """A python3 first on PATH that has these distributions installed (as an image's own)."""
    tmp_path.mkdir(exist_ok=True)
    site = tmp_path / "image-site"
    site.mkdir(exist_ok=True)
    for dist in dists:
        name, version = dist.split("==")
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    bin_dir = tmp_path / "image-bin"
    bin_dir.mkdir(exist_ok=True)
    python = bin_dir / "python3"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec /usr/bin/python3 "$@"\n')
    python.chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def recording_uv(root):
    (root / "bin").mkdir(exist_ok=True)
    uv = root / "bin" / "uv"
    uv.write_text(f'#!/bin/sh\necho "$*" >> {root}/uv.calls\nif [ "$1" = venv ]; then mkdir -p "$5/bin"; exit 0; fi\n'
                  'echo "offline" >&2\nexit 2\n')
    uv.chmod(0o755)


def test_what_the_images_python_has_is_used_as_installed(tmp_path) -> None:
    """An image whose python3 has numpy (a PyTorch built against it) gets pandas only, resolved
    without a second numpy; one that has both gets nothing."""
    import subprocess

    root = tmp_path / "root"
    root.mkdir()
    recording_uv(root)
    env = {"PATH": image_python(tmp_path, "numpy==1.26.4")}
    done = subprocess.run([str(TOOL), str(root), "numpy", "pandas"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.stdout == "failed: uv could not install pandas (the log above says why)\n"
    install = (root / "uv.calls").read_text().splitlines()[-1]
    assert install.endswith(f"--excludes {root}/.base-excludes pandas")
    assert "numpy" in (root / ".base-excludes").read_text().split()

    # Asked with a version, it is installed into the base even so.
    subprocess.run([str(TOOL), str(root), "numpy==2.1.3"], capture_output=True, text=True, env=env, timeout=60)
    assert (root / "uv.calls").read_text().splitlines()[-1].endswith("numpy==2.1.3")
    assert "numpy" not in (root / ".base-excludes").read_text().split()

    both = tmp_path / "both"
    both.mkdir()
    both_root = both / "root"
    both_root.mkdir()
    recording_uv(both_root)
    kept = subprocess.run([str(TOOL), str(both_root), "numpy", "pandas"], capture_output=True, text=True,
                          env={"PATH": image_python(both, "numpy==1.26.4", "pandas==2.2.2")}, timeout=60)
    assert kept.stdout == "kept: python3 has them\n"
    assert not (both_root / "uv.calls").exists()
