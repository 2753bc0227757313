"""Small random PixelCNNs shared by the causality and cached-sampling tests."""

from __future__ import annotations

import torch

from maskedconv import PixelCNN


def build(cfg: dict, dtype: torch.dtype = torch.float32, perturb: bool = False) -> PixelCNN:
    """A seeded PixelCNN from a hypothesis-drawn config (6 hidden channels per image channel).

    ``perturb`` adds noise to every parameter, biases and norms included, so that no
    weight keeps its tidy initial value.
    """
    torch.manual_seed(0)
    c = cfg["in_channels"]
    model = PixelCNN(
        c,
        cfg["levels"],
        hidden_channels=6 * c,
        num_layers=cfg["num_layers"],
        kernel_size=cfg["kernel_size"],
        color_groups=c if cfg["grouped"] else 1,
        group_layout=cfg["group_layout"],
        block=cfg["block"],
    )
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    return model.to(dtype)
