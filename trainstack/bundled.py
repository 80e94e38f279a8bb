"""Where the files trainstack puts on machines are: `bootstrap/` (first boot, the job runner and
the watchdog, the node programs, the tools `invoke train` installs).

In a checkout they are the repository's `bootstrap/`; in an installed wheel, the package data
`trainstack/bootstrap/` (pyproject.toml maps one onto the other). Standard library only: the
Pulumi program (`infra/userdata.py`) reads the first-boot files through it too.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
#: In an installed wheel: package data beside the modules.
INSTALLED = _PACKAGE / "bootstrap"
#: In a checkout (also an editable install): the repository's top-level bootstrap/.
CHECKOUT = _PACKAGE.parent / "bootstrap"


def bootstrap_dir() -> Path:
    # The wheel's copy first: beside an installed package, ../bootstrap is anyone's directory.
    return INSTALLED if INSTALLED.is_dir() else CHECKOUT


def bin_dir() -> Path:
    """What first boot installs into <remote_root>/bin: the runner and the watchdog."""
    return bootstrap_dir() / "bin"


def node_dir() -> Path:
    """The programs the laptop sends over ssh (trainstack/remote/scripts.py)."""
    return bootstrap_dir() / "node"


def tools_dir() -> Path:
    """What `invoke train` installs beside bin/ (trainstack/tools.py)."""
    return bootstrap_dir() / "tools"


def template_path() -> Path:
    """The first-boot script's template (infra/userdata.py)."""
    return bootstrap_dir() / "bootstrap.sh.tmpl"
