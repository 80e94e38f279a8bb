"""The sync and start-up benchmark: trainstack against plain tools, in one run.

`python -m bench` (or `make bench`) generates a reproducible project, starts the
local target, and times every scenario of docs/benchmarks.md side by side with its
baseline; see `python -m bench --help`.
"""
