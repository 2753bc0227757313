"""The examples' training loop (examples/train.py) with models that are not this library's:
anything with ``log_prob(x, labels=, cond=)`` trains, resumes exactly and is evaluated."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from example_stops import StopAtPoll
from torch import Tensor, nn

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))

import files  # noqa: E402
import train  # noqa: E402

pytest.importorskip("tqdm", reason="the examples need the examples extra (tqdm)")


class PixelTable(nn.Module):
    """Every sub-pixel independent, a softmax over K levels each; a table per class."""

    def __init__(self, shape: tuple[int, int, int], levels: int, classes: int = 1) -> None:
        super().__init__()
        self.levels = levels
        self.logits = nn.Parameter(torch.zeros(classes, levels, *shape))
        self.conds: list[Tensor | None] = []

    def log_prob(
        self, x: Tensor, *, labels: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor:
        self.conds.append(cond)
        table = self.logits[0 if labels is None else labels]  # (B, K, C, H, W)
        if labels is None:
            table = table.expand(len(x), *table.shape)
        log_p = table.log_softmax(1).gather(1, x[:, None]).squeeze(1)
        return log_p.flatten(1).sum(1)


def _data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Images (N, 1, 2, 2) of K = 3 levels, each sub-pixel drawn from ``P`` alone."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(P, n, replacement=True, generator=g).T.reshape(n, 1, 2, 2), P


P = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0]])


def _trainer(tmp_path: Path, model: nn.Module, **recipe: int | float) -> train.Trainer:
    x, _ = _data(2048, 0)
    test, _ = _data(1024, 1)
    options = {"epochs": 4, "batch_size": 64, "lr": 0.1, "eval_batch_size": 256, **recipe}
    return train.Trainer(
        model,
        train.Split(x),
        train.Split(test),
        train.Recipe(**options),  # type: ignore[arg-type]
        checkpoint=tmp_path / "checkpoint.pt",
        identity={"test": 1},
        device=torch.device("cpu"),
    )


def test_any_model_with_log_prob_learns_its_distribution(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, PixelTable((1, 2, 2), 3))
    stop = files.StopFlag()
    try:
        assert trainer.fit(stop) is False
    finally:
        stop.close()
    entropy = float(-(P * P.clamp_min(1e-12).log()).sum(1).mean())  # nats per sub-pixel
    curve = trainer.state["test_curve"]
    assert [t["step"] for t in curve] == [32, 64, 96, 128]  # an evaluation per epoch
    assert curve[-1]["nats_per_dim"] == pytest.approx(entropy, abs=0.03)
    assert math.log(3) - entropy > 0.2  # far from where it started (the uniform table)
    assert curve[-1]["bits_per_dim"] == pytest.approx(curve[-1]["nats_per_dim"] / math.log(2))
    assert trainer.test_nll() == curve[-1]["nats_per_dim"]  # no second evaluation
    assert files.load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 128


def test_stopped_and_resumed_equals_a_straight_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    straight = _trainer(tmp_path / "a", PixelTable((1, 2, 2), 3), epochs=2)
    stop = files.StopFlag()
    try:
        straight.fit(stop)
    finally:
        stop.close()

    torch.manual_seed(0)
    first = _trainer(tmp_path / "b", PixelTable((1, 2, 2), 3), epochs=2)
    assert first.fit(StopAtPoll(40)) is True  # in the second epoch
    assert first.stopped_by == "SIGINT" and first.state["step"] == 40
    again = _trainer(tmp_path / "b", PixelTable((1, 2, 2), 3), epochs=2)
    again.resume()
    assert again.state["step"] == 40 and again.state["batch_in_epoch"] == 8
    stop = files.StopFlag()
    try:
        assert again.fit(stop) is False
    finally:
        stop.close()
    model_a, model_b = straight.model, again.model
    assert isinstance(model_a, PixelTable) and isinstance(model_b, PixelTable)
    assert torch.equal(model_a.logits, model_b.logits)
    assert again.state["train_curve"] == straight.state["train_curve"]


def test_labels_and_cond_reach_the_model(tmp_path: Path) -> None:
    # x is its label: a class-conditional table learns it to near certainty; cond_of
    # turns each batch's cond inputs into the model's cond=.
    torch.manual_seed(0)
    labels = torch.arange(512) % 3
    x = labels.view(-1, 1, 1, 1).expand(-1, 1, 2, 2).contiguous()
    model = PixelTable((1, 2, 2), 3, classes=3)
    trainer = train.Trainer(
        model,
        train.Split(x, labels, labels * 10),
        train.Split(x[:60], labels[:60], labels[:60] * 10),
        train.Recipe(epochs=3, batch_size=32, lr=0.3),
        checkpoint=tmp_path / "checkpoint.pt",
        identity={},
        device=torch.device("cpu"),
        cond_of=lambda c: c + 1,
    )
    stop = files.StopFlag()
    try:
        trainer.fit(stop)
    finally:
        stop.close()
    assert trainer.test_nll() < 0.05
    seen = [c for c in model.conds if c is not None]
    assert len(seen) == len(model.conds) == 3 * 16 + 3  # every step and evaluation batch
    assert all(bool(((c - 1) % 10 == 0).all()) and c.max() <= 21 for c in seen)


def test_a_checkpoint_of_another_run_is_refused(tmp_path: Path) -> None:
    first = _trainer(tmp_path, PixelTable((1, 2, 2), 3), max_steps=1)
    stop = files.StopFlag()
    try:
        first.fit(stop)
    finally:
        stop.close()
    other = _trainer(tmp_path, PixelTable((1, 2, 2), 3))
    other.identity = {"test": 2}
    with pytest.raises(files.DataError, match=r"test=1 \(this run: 2\)"):
        other.resume()


def test_a_non_finite_loss_stops_before_its_weights_are_saved(tmp_path: Path) -> None:
    model = PixelTable((1, 2, 2), 3)
    trainer = _trainer(tmp_path, model, max_steps=2)
    stop = files.StopFlag()
    try:
        trainer.fit(stop)
        saved = (tmp_path / "checkpoint.pt").read_bytes()
        with torch.no_grad():
            model.logits[0, 0, 0, 0, 0] = float("inf")  # log_softmax: NaN
        trainer.recipe = train.Recipe(epochs=4, batch_size=64, lr=0.1, max_steps=4)
        with pytest.raises(files.DataError, match="the training loss is nan at step 3"):
            trainer.fit(stop)
    finally:
        stop.close()
    assert (tmp_path / "checkpoint.pt").read_bytes() == saved


def test_compile_wraps_the_objective_and_trains_as_eager(tmp_path: Path) -> None:
    # --compile compiles the loop's objective (the model's log_prob): the model itself is
    # left as it is (no method replaced), and training follows eager's.
    from maskedconv import PixelCNN

    torch._dynamo.reset()
    x = torch.randint(0, 2, (64, 1, 8, 8))
    curves = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = PixelCNN(1, 2, hidden_channels=8, num_layers=2, kernel_size=3)
        trainer = train.Trainer(
            model,
            train.Split(x),
            train.Split(x[:16]),
            train.Recipe(epochs=1, batch_size=16, lr=1e-2, max_steps=3, compile=compiled),
            checkpoint=tmp_path / f"{compiled}.pt",
            identity={},
            device=torch.device("cpu"),
        )
        stop = files.StopFlag()
        try:
            trainer.fit(stop)
        finally:
            stop.close()
        assert "forward_features" not in vars(model) and "log_prob" not in vars(model)
        curves.append([value for _, value in trainer.state["train_curve"]])
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)


def test_max_steps_alone_sets_the_length(tmp_path: Path) -> None:
    # epochs=None: as many epochs as max_steps takes (32 steps an epoch here).
    trainer = _trainer(tmp_path, PixelTable((1, 2, 2), 3), epochs=None, max_steps=40)  # type: ignore[arg-type]
    assert trainer.epochs == 2
    stop = files.StopFlag()
    try:
        trainer.fit(stop)
    finally:
        stop.close()
    assert trainer.state["step"] == 40 and [t["step"] for t in trainer.state["test_curve"]] == [
        32,
        40,
    ]
    with pytest.raises(ValueError, match="needs epochs or max_steps"):
        _trainer(tmp_path, PixelTable((1, 2, 2), 3), epochs=None)  # type: ignore[arg-type]
