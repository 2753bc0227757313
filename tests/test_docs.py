"""The runnable examples of the docs pages written to run as they stand."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import re
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Every page with a ```python block; ```py marks a fragment (a signature, a sketch
# that needs a trained run) that is shown, not run.
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))]


def python_blocks(page: str) -> list[str]:
    """The ```python blocks of ``page``, dedented (a block may sit in a list item)."""
    found = re.findall(r"^( *)```python\n(.*?)^\1```", (ROOT / page).read_text(), flags=re.S | re.M)
    return [textwrap.dedent(block) for _, block in found]


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_page_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each page's blocks run in order in one namespace, as a reader would paste them into
    # a fresh interpreter: a block may use what an earlier block of its page defined.
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {"__name__": "__docs__"}
    for block in python_blocks(page):
        exec(compile(block, page, "exec"), namespace)


def test_every_module_docstring_example_runs() -> None:
    import maskedconv

    # Examples are written for a reader who did `import torch` and imported the public
    # names they use from maskedconv.
    names = {"torch": torch, **{name: getattr(maskedconv, name) for name in maskedconv.__all__}}
    attempted = 0
    for path in sorted(Path(maskedconv.__file__).parent.glob("*.py")):
        module = importlib.import_module(
            f"maskedconv.{path.stem}" if path.stem != "__init__" else "maskedconv"
        )
        flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
        result = doctest.testmod(module, extraglobs=names, optionflags=flags)
        assert result.failed == 0, f"{path.name}: {result.failed} docstring example(s) failed"
        attempted += result.attempted
    assert attempted >= 10  # the examples are found at all


def test_the_blind_spot_pictures_are_current() -> None:
    spec = importlib.util.spec_from_file_location("blind_spot", DOCS / "blind_spot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (DOCS / "gated.md").read_text()
    for name, model in module.models().items():
        block = f"```text\n{name}:\n{module.picture(model)}\n```"
        assert block in page, f"docs/gated.md has an old picture of {name}; run docs/blind_spot.py"
