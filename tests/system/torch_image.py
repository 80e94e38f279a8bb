"""A machine image like the AWS Deep Learning PyTorch AMI, for the multi-node system tests.

The bare Debian tree (hosts.ensure_rootfs) plus what such an image ships before first boot:
the bootstrap's Debian packages and PyTorch (CPU build) with numpy in the system Python. Built
once from a host of its own and cached beside the bare tree. The remote venv, created with
--system-site-packages, must find this PyTorch rather than install it again — so the image's
uv is configured offline (/etc/uv/uv.toml): an attempted download fails the test instead of
fetching a multi-GB wheel.

PyTorch comes from this machine's disk: a `torch==2.13.0` wheel for CPython 3.11 (Debian
bookworm's python3) in /opt/wheels (or $TRAINSTACK_TEST_WHEELS). PyPI serves only a CUDA build
of that version, gigabytes large, so no test ever asks an index for torch; without the wheel
the tests that need it are skipped, naming it. Its dependencies and numpy come from PyPI.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .hosts import HostPool, cache_dir, remove_tree

TORCH_VERSION = "2.13.0"
WHEELS_ENV = "TRAINSTACK_TEST_WHEELS"
DEFAULT_WHEELS = Path("/opt/wheels")
#: Bump to rebuild the cached image.
IMAGE_FORMAT = 1
BOOTSTRAP_TEMPLATE = Path(__file__).resolve().parents[2] / "bootstrap" / "bootstrap.sh.tmpl"
UV_VERSION_RE = re.compile(r"^UV_VERSION=(\S+)$", re.M)
#: Where PyTorch lands in the image: what `pip install` as root puts beside Debian's python3.
SYSTEM_SITE_PACKAGES = "/usr/local/lib/python3.11/dist-packages"
#: The image's uv configuration: never download (see the module docstring).
UV_CONFIG = "/etc/uv/uv.toml"


def torch_wheel() -> Path | None:
    """The local CPU wheel of torch==TORCH_VERSION for CPython 3.11 on x86_64, if there is one."""
    directory = Path(os.environ.get(WHEELS_ENV) or DEFAULT_WHEELS)
    found = sorted(directory.glob(f"torch-{TORCH_VERSION}+cpu-cp311-cp311-*x86_64.whl")) if directory.is_dir() else []
    return found[-1] if found else None


def missing_reason() -> str | None:
    if torch_wheel() is None:
        directory = os.environ.get(WHEELS_ENV) or DEFAULT_WHEELS
        return (
            f"no torch-{TORCH_VERSION}+cpu wheel for CPython 3.11 in {directory} (set {WHEELS_ENV}): "
            "PyPI's torch of that version is a multi-GB CUDA build, never downloaded by these tests"
        )
    return None


def bootstrap_packages() -> list[str]:
    """The Debian packages the first boot installs; present in the image, so it installs none."""
    match = re.search(r'^PACKAGES="([^"]+)"', BOOTSTRAP_TEMPLATE.read_text(), re.M)
    assert match, f"{BOOTSTRAP_TEMPLATE} no longer sets PACKAGES=\"...\""
    return match.group(1).split()


def uv_version() -> str:
    match = UV_VERSION_RE.search(BOOTSTRAP_TEMPLATE.read_text())
    assert match, f"{BOOTSTRAP_TEMPLATE} no longer sets UV_VERSION"
    return match.group(1)


def image_key(base: Path, wheel: Path) -> str:
    recipe = "\n".join([*bootstrap_packages(), wheel.name, uv_version(), str(IMAGE_FORMAT)])
    return f"{base.name}-torch-{TORCH_VERSION}-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}"


def ensure_torch_rootfs(base: Path) -> Path:
    """The cached image tree, built from `base` on first use (locked against other sessions)."""
    wheel = torch_wheel()
    if wheel is None:
        raise RuntimeError(missing_reason())
    directory = cache_dir()
    key = image_key(base, wheel)
    target = directory / key
    with open(directory / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / SYSTEM_SITE_PACKAGES.lstrip("/") / "torch" / "__init__.py").is_file():
            return target
        building = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=directory))
        try:
            with HostPool(base) as pool:
                host = pool.create("image")
                host.install_packages(bootstrap_packages(), timeout=1200)
                shutil.copyfile(wheel, host.path(f"/tmp/{wheel.name}"))
                host.run(
                    ["python3", "-m", "pip", "install", "--break-system-packages", "--no-cache-dir",
                     "--disable-pip-version-check", "-q", f"/tmp/{wheel.name}", "numpy"],
                    timeout=1800,
                )
                host.path(f"/tmp/{wheel.name}").unlink()
                # A warm pip cache for the bootstrap's uv install, as a nearby mirror would be.
                host.run(["python3", "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                          "-d", "/tmp/uv-download", f"uv=={uv_version()}"], timeout=600)
                host.sh("rm -rf /tmp/uv-download /var/lib/apt/lists/* /var/cache/apt/archives/*.deb")
                config = host.path(UV_CONFIG)
                config.parent.mkdir(parents=True, exist_ok=True)
                config.write_text(
                    "# Test image: the venv must use the preinstalled PyTorch; a download is a failure.\n"
                    "offline = true\n"
                )
                # The overlay's merged view; the host's own /proc, /dev and /sys are mounted in its
                # private namespace and do not show here.
                subprocess.run(["cp", "-a", f"{host.root}/.", str(building)], check=True)
            building.rename(target)
        finally:
            if building.exists():
                remove_tree(building)
        return target
