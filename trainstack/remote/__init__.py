"""The remote layer: the one place that reaches a node.

- `scripts`: the node-side programs (files under `bootstrap/node/`, shellchecked like the
  rest of `bootstrap/`) and how they are handed to a node's shell, every value an argument.
- `answers`: how such a program tells the laptop what happened — one line format on
  stderr, one reader.
"""
