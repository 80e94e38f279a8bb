"""`make demo` end to end: scripts/demo.sh in a scratch project directory."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from trainstack import local

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_the_whole_workflow(tmp_path: Path, venv_bin: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSTACK_")}
    env.update(TRAINSTACK_DEMO_PROJECT=str(tmp_path), TRAINSTACK_PYTHON=str(venv_bin / "python"), NO_COLOR="1")
    proc = subprocess.run(
        [str(REPO / "scripts" / "demo.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs" / "local").iterdir())
    assert len(runs) == 1
    run = runs[0]
    final = json.loads((run / "results" / "final.json").read_text())
    assert final["weight_error"] < 0.01
    assert len((run / "results" / "metrics.jsonl").read_text().splitlines()) == 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"epoch-{i:03d}.npz" for i in range(1, 7)]
    assert "epoch 6/6" in (run / "log").read_text()
    assert "epoch 6/6" in proc.stdout  # the followed log
    assert "+ invoke train --command 'python train.py --epochs 6'\n" in proc.stderr  # echoed as typed
    assert f"results of run {run.name} are in {tmp_path}/runs/local/{run.name}" in proc.stdout
    assert not local.LocalTarget(tmp_path).root.exists()  # local.down cleaned up
