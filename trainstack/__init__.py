"""trainstack: one Pulumi stack per ML training experiment.

Kept import-free so `invoke --list` and `infra/` (which imports
`trainstack.contract`) stay fast and never pull in the laptop-side libraries.
"""

__version__ = "0.1.0"
