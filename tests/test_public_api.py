"""The public surface: small, importable, and documented."""

from __future__ import annotations

from pathlib import Path

import maskedconv

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_all_names_import() -> None:
    for name in maskedconv.__all__:
        assert getattr(maskedconv, name) is not None


def test_every_public_name_is_documented() -> None:
    # docs/api.md is generated from the docstrings (mkdocstrings): each public name
    # needs its directive there and a docstring to render.
    api = (DOCS / "api.md").read_text()
    missing = [name for name in maskedconv.__all__ if f"::: maskedconv.{name}\n" not in api]
    assert not missing, f"not in docs/api.md: {missing}"
    bare = [
        name for name in maskedconv.__all__ if not (getattr(maskedconv, name).__doc__ or "").strip()
    ]
    assert not bare, f"public names without a docstring: {bare}"


def test_ships_py_typed() -> None:
    assert (Path(maskedconv.__file__).parent / "py.typed").exists()
