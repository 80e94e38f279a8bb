"""The small training project every end-to-end workflow ships: one place, so the local system
test and the AWS test check the same things."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

#: Small, pure Python, from PyPI: proves the remote venv is built from requirements.txt by uv.
REQUIREMENT = "six==1.17.0"
EPOCHS = 5
COMMAND = "python train.py"

TRAIN_PY = textwrap.dedent(
    f"""\
    import json, os, random, sys, time
    import six  # from requirements.txt, installed into the remote venv

    os.makedirs("results", exist_ok=True)
    os.makedirs("checkpoints", exist_ok=True)
    rng = random.Random(7)
    for epoch in range({EPOCHS}):
        print(f"epoch {{epoch}} loss {{1.0 / (epoch + 1):.4f}}", flush=True)
        time.sleep(0.5)
    with open("checkpoints/model.bin", "wb") as f:
        f.write(bytes(rng.getrandbits(8) for _ in range(256 * 1024)))
    with open("results/metrics.json", "w") as f:
        json.dump({{"epochs": {EPOCHS}, "six": six.__version__, "python": sys.executable}}, f)
    print("done", flush=True)
    """
)

#: What `logs --follow` must show, in order.
EXPECTED_LOG = [f"epoch {epoch} loss {1.0 / (epoch + 1):.4f}" for epoch in range(EPOCHS)] + ["done"]


def write_training_project(workdir: Path) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "train.py").write_text(TRAIN_PY)
    (workdir / "requirements.txt").write_text(f"{REQUIREMENT}\n")
    (workdir / "data").mkdir(exist_ok=True)
    (workdir / "data" / "tiny.csv").write_text("x,y\n1,2\n")


def digests(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file below root."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*")) if path.is_file()
    }


#: Prints "<sha256>  ./<path>" for every file below the current directory (run on a node).
REMOTE_DIGESTS = "find . -type f -print0 | sort -z | xargs -0r sha256sum"


def parse_remote_digests(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        digest, _, path = line.partition("  ")
        found[path.removeprefix("./")] = digest
    return found
