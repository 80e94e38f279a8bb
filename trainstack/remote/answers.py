"""What a node program answers: lines `trainstack-node: <word> [<detail>]` on its stderr.

The one reader of them (`parse`). The words are `contract.NodeAnswer`'s; lists of paths
travel hex-encoded (a file name may hold any byte but NUL, newlines included).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import AnyStr

from trainstack.contract import NodeAnswer

PREFIX = "trainstack-node: "


@dataclass
class Answers:
    #: The outcome word when the program ended early (NodeAnswer.*), else None.
    outcome: str | None = None
    detail: str = ""
    #: Paths moved aside to kept/ (`kept`), and paths a deletion left in place (`left`).
    kept: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    #: The program waited for another sync's lock.
    waited: bool = False
    #: Every other line of stderr, as it came.
    other: str = ""


def parse(stderr: str) -> Answers:
    answers = Answers()
    rest: list[str] = []
    for line in stderr.splitlines():
        if not line.startswith(PREFIX):
            rest.append(line)
            continue
        word, _, detail = line[len(PREFIX):].partition(" ")
        if word == NodeAnswer.KEPT:
            answers.kept += _paths(detail)
        elif word == NodeAnswer.LEFT:
            answers.left += _paths(detail)
        elif word == NodeAnswer.WAITING:
            answers.waited = True
        elif word in NodeAnswer.OUTCOMES:
            answers.outcome, answers.detail = word, detail.strip()
        else:
            rest.append(line)
    answers.other = "\n".join(rest)
    return answers


def _paths(hex_list: str) -> list[str]:
    try:
        raw = bytes.fromhex(hex_list.strip())
    except ValueError:
        return []
    return [os.fsdecode(p) for p in raw.split(b"\0") if p]


def sections(stdout: AnyStr, marker: str, count: int) -> list[AnyStr]:
    """The `count` sections of a program's output (text or bytes), each ended by `marker` on
    a line of its own (`scripts.new_marker`); a section the program did not reach is empty."""
    end = f"\n{marker}\n"
    separator = end.encode() if isinstance(stdout, bytes) else end
    parts = stdout.split(separator)  # type: ignore[arg-type]
    return (parts + [stdout[:0]] * count)[:count]
