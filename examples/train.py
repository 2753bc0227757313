"""The examples' training loop, for any model with ``log_prob(x, labels=, cond=)``.

Plain or under ``torchrun`` (DDP, one process per GPU or CPU), resumed exactly from its
checkpoint, stopped cleanly by Ctrl-C, with a guard against non-finite losses, the test
NLL after each epoch, and the curves. A run reads top to bottom::

    trainer = Trainer(model, Split(train_x), Split(test_x), Recipe(epochs=10, ...),
                      checkpoint=out / "checkpoint.pt", identity={...}, device=device)
    if resume:
        trainer.resume()
    stopped = trainer.fit(stop)

Used by the MNIST examples (``mnist_common.py``), the VQ-VAE prior example's prior stage
and ``compress_mnist.py --train-steps``. It needs nothing of maskedconv: any model will do
(``tests/test_train_loop.py`` trains one of its own).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from files import DataError, StopFlag, atomic_write_bytes, load_checkpoint, save_checkpoint
from plots import save_nll_plot
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm

__all__ = [
    "Dist",
    "LogProb",
    "Recipe",
    "Split",
    "Trainer",
    "add_threads_flag",
    "check_identity",
    "evaluate",
    "keep_freed_memory",
    "pick_device",
    "setup_distributed",
    "torch_threads",
    "write_metrics",
]


class Model(Protocol):
    """What the loop needs of a model: an ``nn.Module`` with ``log_prob``."""

    def log_prob(
        self, x: Tensor, *, labels: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor: ...


@dataclass(frozen=True)
class Recipe:
    """The training recipe. ``max_steps`` ends a run early (smoke runs), or alone sets its
    length (``epochs=None``: the epochs it takes); ``save_every`` checkpoints every so many
    steps as well as after each epoch."""

    epochs: int | None
    batch_size: int  # per process
    lr: float
    clip: float = 1.0  # gradient norm clipping
    max_steps: int | None = None
    seed: int = 0  # the batch order
    amp: bool = False  # bf16 autocast on a GPU; the loss stays float32
    compile: bool = False  # torch.compile the objective
    num_workers: int = 0
    eval_batch_size: int = 500
    save_every: int | None = None


@dataclass
class Split:
    """Images or code maps ``(N, C, H, W)`` of integer values, with per-example labels and
    conditioning inputs where the model takes them (``LogProb.cond_of`` turns a batch of
    ``cond`` into the model's ``cond=``)."""

    x: Tensor
    labels: Tensor | None = None
    cond: Tensor | None = None

    def __len__(self) -> int:
        return len(self.x)

    def shard(self, rank: int, world: int) -> Split:
        """Every ``world``-th example from ``rank``: no example padded or counted twice."""

        def part(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[rank::world]

        return Split(self.x[rank::world], part(self.labels), part(self.cond))


class LogProb(nn.Module):
    """The objective, ``log p(x)`` per example: what DDP and ``torch.compile`` wrap.

    DDP syncs gradients only through its module's ``forward``, so the loop calls this
    module rather than ``model.log_prob``. ``cond_of(batch.cond)`` makes the model's
    ``cond=`` (for example from another, frozen network; not a parameter here).
    """

    def __init__(
        self, model: nn.Module, cond_of: Callable[[Tensor], Tensor | None] | None = None
    ) -> None:
        super().__init__()
        self.model = model
        self.cond_of = cond_of

    def forward(self, x: Tensor, labels: Tensor | None, cond: Tensor | None) -> Tensor:
        model: Model = self.model  # type: ignore[assignment]
        c = None if cond is None or self.cond_of is None else self.cond_of(cond)
        return model.log_prob(x, labels=labels, cond=c)


# ---------------------------------------------------------------- distributed


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(device_flag: str, local_rank: int | None = None) -> torch.device:
    """``--device``: ``auto`` takes CUDA, then MPS, then the CPU.

    ``local_rank`` (under torchrun) chooses the GPU of this process.
    """
    if device_flag == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank or 0)
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    else:
        try:
            device = torch.device(device_flag)
        except RuntimeError:
            raise DataError(
                f"--device {device_flag!r} is not a device: use auto, cpu, cuda, cuda:N or mps"
            ) from None
        if device.type == "cuda" and local_rank is not None and device.index is None:
            device = torch.device("cuda", local_rank)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DataError(f"--device {device_flag}: CUDA is not available on this machine")
        torch.cuda.set_device(device)
    return device


def setup_distributed(device_flag: str) -> tuple[Dist, torch.device]:
    """Join the torchrun process group if launched by torchrun; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    d = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(device_flag, d.local_rank if d.enabled else None)
    if d.enabled:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return d, device


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory for reuse, as ``benchmarks/report.py`` does with
    its ``MALLOC_*`` variables: by default glibc hands large freed blocks back to the OS,
    and a training step then page-faults its activations back in (up to 1.6x slower).
    Returns whether the settings took (glibc on Linux only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's malloc.h
    settings = ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 2**31 - 1), (m_top_pad, 256 << 20))
    return all(mallopt(param, value) == 1 for param, value in settings)


def add_threads_flag(p: argparse.ArgumentParser) -> None:
    """``--threads``, for :func:`torch_threads`."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's, one per core); on a busy or shared CPU, 1 "
        "is often several times faster",
    )


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """``--threads``: torch's intra-op threads for the block (None: torch's default, one
    per core), set back after it for a caller in the same process. On a busy or shared
    CPU, 1 is often several times faster than the default."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=enabled and device.type == "cuda"
    )


# ------------------------------------------------------------------- evaluation


def evaluate(
    objective: LogProb,
    test: Split,
    batch_size: int,
    device: torch.device,
    d: Dist | None = None,
    amp: bool = False,
) -> float:
    """Test NLL over the whole split in nats per dimension, shared across ranks."""
    d = d or Dist()
    objective.eval()
    shard = test.shard(d.rank, d.world)
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of nll in nats, examples)
    with torch.no_grad():
        for start in range(0, len(shard), batch_size):
            batch = slice(start, start + batch_size)
            x = shard.x[batch].to(device, non_blocking=True).long()
            labels = None if shard.labels is None else shard.labels[batch].to(device)
            cond = None if shard.cond is None else shard.cond[batch].to(device)
            with autocast(device, amp):
                log_prob = objective(x, labels, cond)
            total[0] -= log_prob.double().sum()
            total[1] += x.shape[0]
    if d.enabled:
        dist.all_reduce(total)
    return float(total[0] / total[1]) / math.prod(test.x.shape[1:])


# ------------------------------------------------------------------- checkpoints


def check_identity(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint of another configuration, naming what differs (one
    level into nested dicts, such as the model's config)."""
    if saved == current:
        return
    diffs = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            diffs += [
                f"{k}={old.get(k)!r} (this run: {new.get(k)!r})"
                for k in sorted(set(old) | set(new))
                if old.get(k) != new.get(k)
            ]
        elif old != new:
            diffs.append(f"{key}={old!r} (this run: {new!r})")
    raise DataError(
        f"checkpoint {path} is from another configuration: {', '.join(diffs) or saved}; "
        f"pass the same flags, or choose another --out-dir"
    )


def write_metrics(out: Path, state: dict[str, Any], steps_per_epoch: int) -> None:
    """``metrics.json`` (both curves), ``metrics.csv`` (the test NLL) and ``nll.png``."""
    metrics = {
        "train": state["train_curve"],
        "test": state["test_curve"],
        "steps_per_epoch": steps_per_epoch,
    }
    atomic_write_bytes(out / "metrics.json", json.dumps(metrics).encode())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["epoch", "step", "test_nats_per_dim", "test_bits_per_dim"])
    for t in state["test_curve"]:
        writer.writerow(
            [f"{t['epoch']:.3f}", t["step"], f"{t['nats_per_dim']:.6f}", f"{t['bits_per_dim']:.6f}"]
        )
    atomic_write_bytes(out / "metrics.csv", buffer.getvalue().encode())
    save_nll_plot(
        out / "nll.png",
        [tuple(p) for p in state["train_curve"]],
        state["test_curve"],
        steps_per_epoch,
    )


# ------------------------------------------------------------------- the loop


class Trainer:
    """One training run: the model, its optimizer and the run's state, fitted epoch by
    epoch, evaluated and checkpointed after each (and where ``max_steps`` or a signal ends
    the run), resumed exactly from its checkpoint.

    The state is ``epoch``, ``step``, ``batch_in_epoch`` and the curves: ``train_curve``
    holds ``[step, loss]`` per step, ``test_curve`` a dict per evaluation. Losses are in
    nats per dimension. With ``metrics_dir``, each checkpoint also writes
    :func:`write_metrics` there.
    """

    def __init__(
        self,
        model: nn.Module,
        train: Split,
        test: Split,
        recipe: Recipe,
        *,
        checkpoint: Path,
        identity: dict[str, Any],
        device: torch.device,
        d: Dist | None = None,
        cond_of: Callable[[Tensor], Tensor | None] | None = None,
        name: str = "",
        metrics_dir: Path | None = None,
    ) -> None:
        self.model, self.train, self.test, self.recipe = model, train, test, recipe
        self.checkpoint, self.identity, self.device = checkpoint, identity, device
        self.d, self.name, self.metrics_dir = d or Dist(), name, metrics_dir
        self.stopped_by: str | None = None  # the signal that stopped the run, in this process
        self.optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
        self.state: dict[str, Any] = {
            "epoch": 0,
            "step": 0,
            "batch_in_epoch": 0,
            "train_curve": [],
            "test_curve": [],
        }
        self.objective = LogProb(model, cond_of)
        self.net: nn.Module = self.objective
        if self.d.enabled:
            ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(self.objective, device_ids=ids)
        if recipe.compile:
            self.net = torch.compile(self.net)  # type: ignore[assignment]
        self.sampler: DistributedSampler[Any] = DistributedSampler(
            TensorDataset(train.x),
            num_replicas=self.d.world,
            rank=self.d.rank,
            shuffle=True,
            seed=recipe.seed,
            drop_last=True,
        )
        self.steps_per_epoch = len(self.sampler) // recipe.batch_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"--batch-size {recipe.batch_size} is larger than the {len(self.sampler)} "
                f"training examples per process"
            )
        # The run's length in epochs: the recipe's, or as many as max_steps takes.
        if recipe.epochs is not None:
            self.epochs = recipe.epochs
        elif recipe.max_steps is not None:
            self.epochs = math.ceil(recipe.max_steps / self.steps_per_epoch)
        else:
            raise ValueError("a recipe needs epochs or max_steps, but got neither")
        self.dims = math.prod(train.x.shape[1:])

    def resume(
        self,
        check: Callable[[dict[str, Any], dict[str, Any], Path], None] = check_identity,
        upgrade: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        """Continue from the checkpoint: weights, optimizer, RNG and state. A learning rate
        other than the checkpoint's is applied, and said. ``upgrade`` turns a checkpoint of
        an older format into this one."""
        saved = load_checkpoint(self.checkpoint, ("identity",))
        if upgrade is not None:
            saved = upgrade(saved)
        missing = [k for k in ("model", "optimizer", "rng_cpu", *self.state) if k not in saved]
        if missing:
            raise DataError(
                f"{self.checkpoint} is not a checkpoint of this example: it lacks "
                f"{', '.join(missing)}"
            )
        check(saved["identity"], self.identity, self.checkpoint)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])  # moved to the model's device
        old_lr, lr = self.optimizer.param_groups[0]["lr"], self.recipe.lr
        if old_lr != lr:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.d.main:
                print(f"--resume: learning rate changed from {old_lr:g} to {lr:g}")
        torch.set_rng_state(saved["rng_cpu"])
        self.state = {key: saved[key] for key in self.state}

    def reached_max(self) -> bool:
        return self.recipe.max_steps is not None and self.state["step"] >= self.recipe.max_steps

    def fit(self, stop: StopFlag) -> bool:
        """Train to the end of the run; True if a signal stopped it (in any process)."""
        stopped = False
        while self.state["epoch"] < self.epochs and not self.reached_max() and not stopped:
            stopped = self._epoch(stop)
            if self.state["batch_in_epoch"] >= self.steps_per_epoch:
                self.state["epoch"] += 1
                self.state["batch_in_epoch"] = 0
            if not stopped:  # after each epoch, and where max_steps ends a run
                self.evaluate()
            self.save()
        return stopped

    def _loader(self) -> DataLoader[tuple[Tensor, ...]]:
        """The rest of the current epoch's batches (to ``max_steps``), in the sampler's
        order for this epoch: a resumed run draws the batches it would have."""
        state, recipe = self.state, self.recipe
        self.sampler.set_epoch(state["epoch"])
        indices = list(self.sampler)
        size = recipe.batch_size
        order = [indices[i : i + size] for i in range(0, len(indices), size)]
        last = self.steps_per_epoch
        if recipe.max_steps is not None:
            last = min(last, state["batch_in_epoch"] + recipe.max_steps - state["step"])
        n = len(self.train)
        placeholder = torch.zeros(n, dtype=torch.uint8)  # for what the split lacks
        tensors = [
            self.train.x,
            placeholder if self.train.labels is None else self.train.labels,
            placeholder if self.train.cond is None else self.train.cond,
        ]
        return DataLoader(
            TensorDataset(*tensors),
            batch_sampler=order[state["batch_in_epoch"] : last],
            num_workers=recipe.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def _epoch(self, stop: StopFlag) -> bool:
        """The rest of the current epoch (to ``max_steps``); True if a signal stopped it."""
        state, d = self.state, self.d
        loader = self._loader()
        self.model.train()
        bar = tqdm(
            total=state["batch_in_epoch"] + len(loader),
            initial=state["batch_in_epoch"],
            desc=f"{self.name}epoch {state['epoch'] + 1}/{self.epochs}",
            disable=not d.main,
            dynamic_ncols=True,
        )
        started, seen, stopped = time.perf_counter(), 0, False
        for x, labels, cond in loader:
            value = self._step(
                x,
                None if self.train.labels is None else labels,
                None if self.train.cond is None else cond,
            )
            seen += x.shape[0] * d.world
            state["train_curve"].append([state["step"], value])
            bar.set_postfix(  # this step's loss, shown with this step's count
                nats_per_dim=f"{value:.4f}",
                img_s=f"{seen / (time.perf_counter() - started):.0f}",
                refresh=False,
            )
            bar.update(1)
            self.stopped_by = stop.requested
            stopped = self.stopped_by is not None
            if d.enabled:  # ranks that stop at different steps would hang DDP
                flag = torch.tensor([float(stopped)], device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopped = bool(flag.item())
            if stopped or self.reached_max():
                break
            every = self.recipe.save_every
            if every is not None and state["step"] % every == 0:
                self.save()
        bar.close()
        return stopped

    def _step(self, x: Tensor, labels: Tensor | None, cond: Tensor | None) -> float:
        """One optimizer step on the batch; its loss in nats/dim."""
        device = self.device
        x = x.to(device, non_blocking=True).long()
        labels = None if labels is None else labels.to(device, non_blocking=True)
        cond = None if cond is None else cond.to(device, non_blocking=True)
        try:
            with autocast(device, self.recipe.amp):
                loss = -self.net(x, labels, cond).mean() / self.dims
        except ValueError as err:  # e.g. NaN weights: log_prob refuses them
            raise DataError(
                f"at step {self.state['step'] + 1}: {err}; stopping (the checkpoint in "
                f"{self.checkpoint.parent} is from before it)"
            ) from None
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), self.recipe.clip)
        self.optimizer.step()
        self.state["step"] += 1
        self.state["batch_in_epoch"] += 1
        value = float(loss.item())
        if not math.isfinite(value):
            # Stop before this step's weights reach a checkpoint: the last saved one stays
            # the last good one.
            raise DataError(
                f"the training loss is {value} at step {self.state['step']}: stopping (the "
                f"checkpoint in {self.checkpoint.parent} is from before it); lower --lr or "
                f"--clip, or check the data and the checkpoint"
            )
        return value

    def evaluate(self) -> float:
        """The test NLL now (nats/dim), appended to the test curve."""
        state, recipe = self.state, self.recipe
        if self.d.main:
            print(f"{self.name}evaluating on the {len(self.test)} test examples ...", flush=True)
        nats = evaluate(
            self.objective, self.test, recipe.eval_batch_size, self.device, self.d, recipe.amp
        )
        state["test_curve"].append(
            {
                "epoch": state["epoch"] + state["batch_in_epoch"] / self.steps_per_epoch,
                "step": state["step"],
                "nats_per_dim": nats,
                "bits_per_dim": nats / math.log(2),
            }
        )
        if self.d.main:
            bits = nats / math.log(2)
            print(f"step {state['step']}: test NLL {nats:.4f} nats/dim, {bits:.4f} bits/dim")
        return nats

    def test_nll(self) -> float:
        """The test NLL at the current step (nats/dim): the last evaluation's, or a new one."""
        curve = self.state["test_curve"]
        if curve and curve[-1]["step"] == self.state["step"]:
            return float(curve[-1]["nats_per_dim"])
        return self.evaluate()

    def save(self) -> None:
        """The checkpoint (and the metrics), written by the main process only."""
        if self.d.main:
            checkpoint = {
                "identity": self.identity,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                **self.state,
            }
            save_checkpoint(self.checkpoint, checkpoint)
            if self.metrics_dir is not None:
                write_metrics(self.metrics_dir, self.state, self.steps_per_epoch)
        if self.d.enabled:
            dist.barrier()

    def ranks_agree(self) -> bool:
        """Whether every rank holds the same parameters (float64 sums), as DDP should keep
        them; True in a single process."""
        if not self.d.enabled:
            return True
        sums = torch.stack([p.detach().double().sum() for p in self.model.parameters()])
        gathered = [torch.zeros_like(sums) for _ in range(self.d.world)]
        dist.all_gather(gathered, sums)
        return all(torch.equal(g, gathered[0]) for g in gathered)
