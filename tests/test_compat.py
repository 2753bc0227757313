"""0.1 checkpoints keep working, and the package's structure stays one-way."""

from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import maskedconv
from maskedconv import GatedPixelCNN, GatedPixelCNNConfig, PixelCNN, PixelCNNConfig, sample

FIXTURE = Path(__file__).parent / "fixtures" / "pixelcnn_0.1.0.pt"
SRC = Path(maskedconv.__file__).parent


@pytest.mark.parametrize(
    "name",
    ["gray_residual", "rgb_blocked_residual", "rgb_interleaved_bottleneck", "rgb_independent"],
)
def test_a_0_1_state_dict_loads_and_gives_the_same_log_prob(name: str) -> None:
    saved = torch.load(FIXTURE, weights_only=True)[name]
    model = PixelCNN.from_config(saved["config"])  # a 0.1 config: no head or input keys
    model.load_state_dict(saved["state_dict"])  # strict: every 0.1 key finds its layer
    torch.testing.assert_close(model(saved["x"]), saved["logits"])
    torch.testing.assert_close(model.log_prob(saved["x"]), saved["log_prob"])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    shape = (2, model.in_channels, 3, 3)
    fast = sample(model, shape, generator=g(), method="cached")
    assert torch.equal(fast, sample(model, shape, generator=g(), method="naive"))


def test_a_0_1_state_dict_with_a_wrong_shape_is_still_refused() -> None:
    saved = torch.load(FIXTURE, weights_only=True)["gray_residual"]
    config = dict(saved["config"], hidden_channels=4)
    with pytest.raises(RuntimeError, match=r"size mismatch for trunk\.0\.conv\.weight"):
        PixelCNN.from_config(config).load_state_dict(saved["state_dict"])


@pytest.mark.parametrize(
    ("cls", "config"), [(PixelCNN, PixelCNNConfig), (GatedPixelCNN, GatedPixelCNNConfig)]
)
def test_config_fields_are_the_constructor_keywords(cls: type, config: type) -> None:
    params = inspect.signature(cls.__init__).parameters
    assert list(params)[1:] == [f.name for f in fields(config)]
    for f in fields(config):  # and the defaults agree
        assert params[f.name].default in (f.default, inspect.Parameter.empty), f.name
    model = PixelCNN(3, 16, head="dmol", input="embedding", embedding_dim=3, hidden_channels=6)
    again = PixelCNN.from_config(model.config.to_dict())
    assert again.config == model.config and again.stem.embedding_dim == 3


# Public submodules: namespaces that only re-export names of private modules.
PUBLIC_SUBMODULES = {"codec"}


def test_public_names_only_at_the_top() -> None:
    modules = [p.stem for p in SRC.glob("*.py") if p.stem != "__init__"]
    assert all(m.startswith("_") or m in PUBLIC_SUBMODULES for m in modules), modules
    for name in PUBLIC_SUBMODULES:
        tree = ast.parse((SRC / f"{name}.py").read_text())
        for node in tree.body:
            assert isinstance(node, (ast.Expr, ast.ImportFrom, ast.Assign)), ast.dump(node)
            if isinstance(node, ast.ImportFrom):
                assert node.level == 1 and node.module.startswith("_"), ast.dump(node)


def test_import_graph_has_no_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for path in SRC.glob("_*.py"):
        if path.stem == "__init__":
            continue
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                deps.add(node.module)
        graph[path.stem] = deps
    for model_module in ("_models", "_pixelcnn", "_gated"):
        assert model_module not in graph["_evaluation"], "the evaluators must not import a model"
    assert graph["_causality"] == set(), "the checker depends on nothing but torch"
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        if state.get(name) == 1:
            raise AssertionError(f"import cycle: {' -> '.join([*trail, name])}")
        if state.get(name) == 2:
            return
        state[name] = 1
        for dep in graph.get(name, ()):
            visit(dep, [*trail, name])
        state[name] = 2

    for name in graph:
        visit(name, [])


FIXTURES_0_2 = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["pixelcnn_dmol_labels", "gated_cond"])
def test_0_2_models_load_and_give_the_same_log_prob(name: str) -> None:
    saved = torch.load(FIXTURES_0_2 / "models_0.2.pt", weights_only=True)[name]
    cls = GatedPixelCNN if name.startswith("gated") else PixelCNN
    extra = {k: saved[k] for k in ("labels", "cond") if k in saved}
    # A 0.2 state_dict (layers by name: input_conv, blocks, layers...) into the 0.3 trunk.
    model = cls(**saved["config"])
    model.load_state_dict(saved["state_dict"])  # strict: every 0.2 key finds its unit
    model.eval()
    torch.testing.assert_close(model.log_prob(saved["x"], **extra), saved["log_prob"])
    # A 0.2 save_pretrained directory.
    loaded = cls.from_pretrained(FIXTURES_0_2 / "pretrained_0.2" / name)
    torch.testing.assert_close(loaded.log_prob(saved["x"], **extra), saved["log_prob"])
    # And it samples the same through every path.
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kwargs = {k: v[:2] for k, v in extra.items()}
    shape = (2, model.in_channels, 3, 5)
    fast = sample(model, shape, generator=g(), method="cached", **kwargs)
    assert torch.equal(fast, sample(model, shape, generator=g(), method="naive", **kwargs))


def test_no_private_module_exports_helpers() -> None:
    # A private module's __all__ names only what the package makes public.
    public = set(maskedconv.__all__)
    for name in PUBLIC_SUBMODULES:
        public |= set(importlib.import_module(f"maskedconv.{name}").__all__)
    for path in SRC.glob("_*.py"):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"maskedconv.{path.stem}")
        extra = set(getattr(module, "__all__", [])) - public
        assert not extra, f"{path.stem}.__all__ exports helpers: {sorted(extra)}"
