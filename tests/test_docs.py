"""The runnable examples of the docs pages written to run as they stand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


@pytest.mark.parametrize("page", ["pixelcnn.md", "heads-and-stems.md", "incremental.md"])
def test_page_examples_run(page: str) -> None:
    blocks = python_blocks(page)
    assert blocks, f"no python example in {page}"
    torch.manual_seed(0)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), namespace)
