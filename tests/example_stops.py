"""A scripted Ctrl-C for the tests of the examples' training loops."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import files  # noqa: E402


class StopAtPoll(files.StopFlag):
    """A Ctrl-C that arrives while the ``n``-th training step of a run is taken, counting
    steps after the first ``start`` (those of an earlier stage, say)."""

    def __init__(self, n: int, start: int = 0) -> None:
        super().__init__()
        self._n, self._polls = n, -start

    @property  # type: ignore[override]
    def requested(self) -> str | None:
        self._polls += 1
        return "SIGINT" if self._polls == self._n else None

    @requested.setter
    def requested(self, value: str | None) -> None:
        pass
