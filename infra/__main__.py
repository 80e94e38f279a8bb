"""Entry point for `pulumi up`: this repository's Pulumi.yaml says `main: infra/`.

Pulumi runs this file with infra/ as the working directory, so the directory above is put on
sys.path for the package to import the same way it does in the tests. The package is named
after its directory: `infra` in a checkout, `trainstack_infra` in the installed wheel (where a
project of your own calls `trainstack_infra.program.main()` instead; see `trainstack init`).
"""

import importlib
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

importlib.import_module(f"{_HERE.name}.program").main()
