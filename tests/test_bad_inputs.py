"""A probe of bad inputs across the public API, as a careful user would try them.

Each must be refused with a ``ValueError`` or ``TypeError`` whose message names the
argument (or what is wrong with it); none may go through (silently wrong) or fail with
another exception (an obscure failure). The test prints the tally.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from maskedconv import (
    Categorical,
    DiscretizedLogisticMixture,
    FullForwardEvaluator,
    GatedPixelCNN,
    IncrementalEvaluator,
    MaskedConv2d,
    PixelCNN,
    Schedule,
    allowed_dependencies,
    assert_causal,
    make_mask,
    masked_conv2d,
    nll_per_dim,
    raster,
    receptive_field,
    sample,
    wavefront,
)


def _tiny() -> PixelCNN:
    return PixelCNN(1, 4, hidden_channels=4, num_layers=1, kernel_size=3)


def _rgb() -> PixelCNN:
    return PixelCNN(3, 4, hidden_channels=6, num_layers=1, kernel_size=3)


def _long(*shape: int, value: int = 0) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.long)


# (what, call, words the message must contain)
CASES: list[tuple[str, Callable[[], object], str]] = [
    # --- layers and masks
    ("conv: mask_type 'C'", lambda: MaskedConv2d(1, 2, 3, mask_type="C"), "mask_type"),
    ("conv: even kernel type B", lambda: MaskedConv2d(1, 2, 4, mask_type="B"), "kernel"),
    ("conv: kernel 0", lambda: MaskedConv2d(1, 2, 0), "kernel"),
    ("conv: groups not dividing", lambda: MaskedConv2d(4, 6, 3, color_groups=4), "color_groups"),
    ("conv: color_groups 0", lambda: MaskedConv2d(3, 6, 3, color_groups=0), "color_groups"),
    (
        "conv: layout 'x'",
        lambda: MaskedConv2d(3, 6, 3, color_groups=3, group_layout="x"),
        "group_layout",
    ),
    (
        "conv: wrong input channels",
        lambda: MaskedConv2d(3, 6, 3)(torch.randn(1, 4, 5, 5)),
        "channels",
    ),
    ("conv: 3-d input", lambda: MaskedConv2d(1, 2, 3)(torch.randn(1, 5, 5)), "input"),
    (
        "masked_conv2d: 0.5 mask",
        lambda: masked_conv2d(
            torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3), torch.full((1, 1, 3, 3), 0.5)
        ),
        "mask",
    ),
    (
        "make_mask: unknown type",
        lambda: make_mask("Z", out_channels=1, in_channels=1, kernel_size=3),
        "mask_type",
    ),
    (
        "make_mask: even kernel",
        lambda: make_mask("B", out_channels=1, in_channels=1, kernel_size=(4, 4)),
        "kernel",
    ),
    (
        "allowed_dependencies: groups 0",
        lambda: allowed_dependencies(2, 2, 3, 3, color_groups=0),
        "color_groups",
    ),
    (
        "allowed_dependencies: type 'C'",
        lambda: allowed_dependencies(2, 2, 3, 3, mask_type="C"),
        "mask_type",
    ),
    # --- models
    ("PixelCNN: levels 1", lambda: PixelCNN(1, 1), "levels"),
    ("PixelCNN: levels 2.5", lambda: PixelCNN(1, 2.5), "levels"),  # type: ignore[arg-type]
    ("PixelCNN: in_channels 0", lambda: PixelCNN(0, 2), "in_channels"),
    ("PixelCNN: num_layers 0", lambda: PixelCNN(1, 2, num_layers=0), "num_layers"),
    ("PixelCNN: hidden 0", lambda: PixelCNN(1, 2, hidden_channels=0), "hidden_channels"),
    ("PixelCNN: kernel 4", lambda: PixelCNN(1, 2, kernel_size=4), "kernel_size"),
    ("PixelCNN: head 'gauss'", lambda: PixelCNN(1, 2, head="gauss"), "head"),
    ("PixelCNN: input 'onehot'", lambda: PixelCNN(1, 2, input="onehot"), "input"),
    ("PixelCNN: block 'dense'", lambda: PixelCNN(1, 2, block="dense"), "block"),
    (
        "PixelCNN: dmol with 3 groups",
        lambda: PixelCNN(3, 256, head="dmol", color_groups=3),
        "color_groups",
    ),
    (
        "PixelCNN: hidden not divisible by groups",
        lambda: PixelCNN(3, 4, hidden_channels=8),
        "hidden_channels",
    ),
    ("PixelCNN: num_classes 0", lambda: PixelCNN(1, 2, num_classes=0), "num_classes"),
    ("PixelCNN: 10^7 layers", lambda: PixelCNN(1, 2, num_layers=10_000_000), "memory"),
    ("GatedPixelCNN: kernel 2", lambda: GatedPixelCNN(1, 2, kernel_size=2), "kernel_size"),
    ("forward: float image", lambda: _tiny()(torch.zeros(1, 1, 4, 4)), "dtype"),
    ("forward: values 4 of 4 levels", lambda: _tiny()(_long(1, 1, 4, 4, value=4)), "[0, 4)"),
    ("forward: negative values", lambda: _tiny()(_long(1, 1, 4, 4, value=-1)), "[0, 4)"),
    ("forward: 2 channels", lambda: _tiny()(_long(1, 2, 4, 4)), "(B, 1, H, W)"),
    ("forward: 3-d image", lambda: _tiny()(_long(1, 4, 4)), "(B, 1, H, W)"),
    (
        "forward: labels to an unconditioned model",
        lambda: _tiny()(_long(1, 1, 4, 4), labels=_long(1)),
        "labels",
    ),
    (
        "forward: no labels to a class model",
        lambda: PixelCNN(1, 2, hidden_channels=4, num_layers=1, num_classes=3)(_long(1, 1, 4, 4)),
        "labels",
    ),
    (
        "forward: label 3 of 3 classes",
        lambda: PixelCNN(1, 2, hidden_channels=4, num_layers=1, num_classes=3)(
            _long(1, 1, 4, 4), labels=_long(1, value=3)
        ),
        "labels",
    ),
    (
        "forward: inf cond",
        lambda: PixelCNN(1, 2, hidden_channels=4, num_layers=1, cond_channels=1)(
            _long(1, 1, 4, 4), cond=torch.full((1, 1, 2, 2), math.inf)
        ),
        "cond",
    ),
    (
        "log_prob_from_params: 3 levels for 4",
        lambda: _tiny().log_prob_from_params(torch.randn(1, 1, 3, 4, 4), _long(1, 1, 4, 4)),
        "params",
    ),
    ("nll_per_dim: empty image", lambda: nll_per_dim(torch.zeros(2), (1, 0, 28)), "shape"),
    (
        "load_state_dict: residual into bottleneck",
        lambda: PixelCNN(1, 2, hidden_channels=8, num_layers=2, block="bottleneck").load_state_dict(
            PixelCNN(1, 2, hidden_channels=8, num_layers=2).state_dict()
        ),
        "kernel",
    ),
    (
        "from_pretrained: missing folder",
        lambda: PixelCNN.from_pretrained("/nonexistent/folder"),
        "config.json",
    ),
    # --- heads
    ("Categorical: levels 1", lambda: Categorical(1), "levels"),
    (
        "mixture: 0 mixtures",
        lambda: DiscretizedLogisticMixture(256, num_mixtures=0),
        "num_mixtures",
    ),
    # --- sampling
    ("sample: temperature 0", lambda: _tiny().sample(1, (3, 3), temperature=0), "temperature"),
    (
        "sample: temperature nan",
        lambda: _tiny().sample(1, (3, 3), temperature=math.nan),
        "temperature",
    ),
    ("sample: 0 images", lambda: _tiny().sample(0, (3, 3)), "num_samples"),
    ("sample: size (0, 3)", lambda: _tiny().sample(1, (0, 3)), "image_size"),
    ("sample: method 'fast'", lambda: _tiny().sample(1, (3, 3), method="fast"), "method"),
    ("sample: schedule 'zigzag'", lambda: _tiny().sample(1, (3, 3), schedule="zigzag"), "schedule"),
    (
        "sample: schedule of another size",
        lambda: _tiny().sample(1, (3, 3), schedule=raster((4, 4))),
        "schedule",
    ),
    ("sample: generator not one", lambda: _tiny().sample(1, (3, 3), generator=0), "generator"),  # type: ignore[arg-type]
    ("sample: x without known", lambda: sample(_tiny(), x=_long(1, 1, 3, 3)), "known"),
    (
        "sample: known not bool",
        lambda: sample(_tiny(), x=_long(1, 1, 3, 3), known=_long(1, 1, 3, 3)),
        "known",
    ),
    (
        "sample: known values out of range",
        lambda: sample(
            _tiny(), x=_long(1, 1, 3, 3, value=9), known=torch.ones(1, 1, 3, 3, dtype=torch.bool)
        ),
        "[0, 4)",
    ),
    (
        "sample: color_groups contradicting",
        lambda: _rgb().sample(1, (2, 2), color_groups=1),
        "color_groups",
    ),
    # --- evaluators and schedules
    ("evaluator: batch 0", lambda: IncrementalEvaluator(_tiny(), 0, (3, 3)), "batch_size"),
    (
        "evaluator: group_layout contradicting",
        lambda: IncrementalEvaluator(_rgb(), 1, (2, 2), group_layout="interleaved"),
        "group_layout",
    ),
    (
        "evaluator: float values",
        lambda: IncrementalEvaluator(_tiny(), 1, (2, 2)).params(torch.zeros(1, 1, 1)),
        "integer",
    ),
    (
        "evaluator: values of another shape",
        lambda: IncrementalEvaluator(_tiny(), 1, (2, 2)).params(_long(1, 1, 5)),
        "shape",
    ),
    (
        "evaluator: values out of range",
        lambda: IncrementalEvaluator(_tiny(), 1, (2, 2)).params(_long(1, 1, 1, value=7)),
        "[0, 4)",
    ),
    ("full evaluator: batch -1", lambda: FullForwardEvaluator(_tiny(), -1, (2, 2)), "batch_size"),
    ("Schedule: a position twice", lambda: Schedule([[(0, 0)], [(0, 0)]], (1, 1)), "twice"),
    ("Schedule: a position outside", lambda: Schedule([[(0, 0)], [(5, 5)]], (1, 2)), "outside"),
    ("Schedule: a position never visited", lambda: Schedule([[(0, 0)]], (1, 2)), "never"),
    ("wavefront: slope 0", lambda: wavefront(_tiny(), (4, 4), slope=0), "slope"),
    # --- the checker
    ("assert_causal: 2-d shape", lambda: assert_causal(_tiny(), (4, 4)), "input_shape"),
    ("assert_causal: wrong channels", lambda: assert_causal(_tiny(), (1, 3, 4, 4)), "channels"),
    (
        "assert_causal: mask_type 'C'",
        lambda: assert_causal(_tiny(), (1, 1, 4, 4), mask_type="C"),
        "mask_type",
    ),
    (
        "assert_causal: labels of another length",
        lambda: assert_causal(
            PixelCNN(1, 2, hidden_channels=4, num_layers=1, num_classes=3),
            (3, 1, 4, 4),
            labels=_long(2),
        ),
        "labels",
    ),
    (
        "receptive_field: pixel outside",
        lambda: receptive_field(_tiny(), (1, 4, 4), (9, 9)),
        "pixel",
    ),
]


def test_every_bad_input_is_refused_clearly() -> None:
    refused, obscure, silent = [], [], []
    for what, call, words in CASES:
        try:
            call()
        except (ValueError, TypeError, FileNotFoundError) as error:
            (refused if words.lower() in str(error).lower() else obscure).append(
                f"{what}: {type(error).__name__}: {error}"
            )
        except Exception as error:  # what the probe is looking for
            obscure.append(f"{what}: {type(error).__name__}: {error}")
        else:
            silent.append(what)
    print(
        f"\n{len(refused)} of {len(CASES)} refused clearly; obscure {len(obscure)}, silent {len(silent)}"
    )
    assert not silent, f"accepted silently: {silent}"
    assert not obscure, "\n".join(obscure)


@pytest.mark.parametrize("threads", [1])
def test_the_probe_covers_each_part_of_the_api(threads: int) -> None:
    # At least a few cases for each public area, so that the tally means something.
    areas = ["conv", "PixelCNN", "forward", "sample", "evaluator", "Schedule", "assert_causal"]
    for area in areas:
        assert sum(what.startswith(area) for what, _, _ in CASES) >= 1, area
    assert len(CASES) >= 60
