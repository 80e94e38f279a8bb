"""Entry point for `pulumi up` (Pulumi.yaml: `main: infra/`).

Pulumi runs this file with infra/ as the working directory, so the project root is put on
sys.path for `import infra.*` to resolve the same way it does in the tests.
"""

import sys
from pathlib import Path

_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
if _PROJECT_ROOT not in sys.path:
    sys.path.insert(0, _PROJECT_ROOT)

from infra.program import main  # noqa: E402

main()
