"""`invoke ls` piped: one header line and one line per experiment, tab-separated, never wrapped."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from trainstack.experiments import COLUMNS

REPO = Path(__file__).resolve().parent.parent


def test_ls_into_a_pipe_is_plain_tab_separated_text(venv_bin: Path, local_sshd, project_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSTACK_")}
    env.update(NO_COLOR="1", COLUMNS="200")
    proc = subprocess.run([str(venv_bin / "invoke"), "--search-root", str(REPO), "ls"],
                          cwd=project_dir, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split("\t") == [title for _, title in COLUMNS]
    assert len(lines) == 2
    cells = lines[1].split("\t")
    assert len(cells) == len(COLUMNS) and cells[0] == "local" and cells[1] == "running"
    assert not set(proc.stdout) & set("│┃━─┏└")
