"""The public surface: small, importable, and documented."""

from __future__ import annotations

from pathlib import Path

import maskedconv

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_all_names_import() -> None:
    for name in maskedconv.__all__:
        assert getattr(maskedconv, name) is not None


def test_every_public_name_is_documented() -> None:
    api = (DOCS / "api.md").read_text()
    missing = [name for name in maskedconv.__all__ if f"`{name}`" not in api]
    assert not missing, f"not in docs/api.md: {missing}"


def test_ships_py_typed() -> None:
    assert (Path(maskedconv.__file__).parent / "py.typed").exists()
