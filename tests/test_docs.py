"""The runnable examples of the docs pages written to run as they stand."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


@pytest.mark.parametrize(
    "page", ["pixelcnn.md", "heads-and-stems.md", "incremental.md", "gated.md"]
)
def test_page_examples_run(page: str) -> None:
    blocks = python_blocks(page)
    assert blocks, f"no python example in {page}"
    torch.manual_seed(0)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, f"docs/{page}", "exec"), namespace)


def test_the_blind_spot_pictures_are_current() -> None:
    spec = importlib.util.spec_from_file_location("blind_spot", DOCS / "blind_spot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (DOCS / "gated.md").read_text()
    for name, model in module.models().items():
        block = f"```text\n{name}:\n{module.picture(model)}\n```"
        assert block in page, f"docs/gated.md has an old picture of {name}; run docs/blind_spot.py"
