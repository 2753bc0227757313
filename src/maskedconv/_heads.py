"""Output distributions: what a model's last layer parameterises at every pixel.

A head turns the ``P`` channels of a model's last layer into a distribution over the
``K`` levels of each sub-pixel. It knows how many channels it needs for C image
channels, scores integer images (log p in nats, per sub-pixel), and draws values at
one position with a generator and a temperature.

* ``Categorical``: a softmax over K levels per sub-pixel (PixelCNN, 2016).
* ``DiscretizedLogisticMixture``: a mixture of discretized logistics per pixel
  with the channels coupled linearly (PixelCNN++, Salimans et al., 2017).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import positive_int

__all__ = ["Categorical", "DiscretizedLogisticMixture", "OutputHead"]


def draw_from_log_probs(logits: Tensor, temperature: float, noise: Tensor) -> Tensor:
    """One draw per row of ``(B, n, K)`` logits from ``softmax(logits / temperature)``.

    Inverse-CDF sampling: the uniform ``noise[b, i]`` in ``[0, 1)`` picks the first level
    whose cumulative probability is above it. Same distribution as ``torch.multinomial``,
    at a fraction of its per-call cost, and the same draw for the same uniform whatever
    order the positions are drawn in.

    Returns:
        ``(B, n)`` int64.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(dtype)
    if temperature != 1.0:
        # Shifted so that the largest is exactly 0 and kept so: a tiny temperature then
        # sends the others to -inf (the most likely level), where logits / T alone would
        # overflow, and 0 / T with T rounding to 0 would be NaN.
        shifted = logits - logits.amax(-1, keepdim=True)
        logits = torch.where(shifted == 0, shifted, shifted / temperature)
    cdf = torch.softmax(logits, dim=-1).cumsum_(-1)  # (B, n, K)
    u = noise.to(dtype).unsqueeze(-1).contiguous()  # (B, n, 1)
    # The number of cumulative values <= u; rounding can leave the last one just below
    # u: clamp to K - 1.
    draw = torch.searchsorted(cdf, u, right=True).squeeze_(-1)
    return draw.clamp_(max=logits.shape[-1] - 1)


class OutputHead(ABC):
    """The base of an output distribution; subclass it for a head of your own.

    Parameters come from the model's last layer as ``(B, P, *S)`` with
    ``P = num_params(C)``, where ``*S`` is ``(H, W)`` for whole images, ``(n,)`` for the
    n positions of a schedule step, and empty at single positions (``sample``).

    A subclass must define ``levels`` (K), ``num_params``, ``log_prob`` and ``sample``;
    ``default_color_groups``, ``check_color_groups``, ``arrange`` and ``config`` have
    defaults (one group per channel; any G; the last layer's output as it is; not
    storable in a config). ``model.save_pretrained`` needs ``config`` (a library head).

    Example:
        A softmax whose logits are halved (a head of your own)::

            class Soft(Categorical):
                def arrange(self, out, channels, group_layout):
                    return super().arrange(out, channels, group_layout) / 2

            model = PixelCNN(1, 4, head=Soft(4))
    """

    levels: int

    @abstractmethod
    def num_params(self, channels: int) -> int:
        """P, the channels the last layer must produce for ``channels`` image channels."""

    def default_color_groups(self, channels: int) -> int:
        """G when the model is not told: one group per channel (R -> G -> B)."""
        return channels

    def check_color_groups(  # noqa: B027
        self, channels: int, color_groups: int | list[int]
    ) -> None:
        """Raise ``ValueError`` if this head cannot serve ``color_groups`` ordered groups
        (G, or the sizes of uneven groups)."""

    def arrange(self, out: Tensor, channels: int, group_layout: str) -> Tensor:
        """The head's parameters from the last layer's ``(B, P, *S)`` output."""
        return out

    @abstractmethod
    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """``log p`` in nats of each sub-pixel given the ones before it.

        Args:
            params: as ``arrange`` returns them, ``(B, ..., *S)``.
            x: ``(B, C, *S)`` integer values in ``[0, K)``.

        Returns:
            ``(B, C, *S)``, in at least float32; the sum over sub-pixels is ``log p(x)``.
        """

    @abstractmethod
    def sample(
        self,
        params: Tensor,
        given: Tensor,
        wanted: Tensor | None,
        *,
        channels: slice,
        noise: Tensor,
        temperature: float,
    ) -> Tensor:
        """Draw the sub-pixels of ``channels`` at N positions (N = batch x positions).

        Each sub-pixel is drawn by the inverse CDF of its distribution given the ones
        before it, from its own uniform in ``noise``: the same uniforms give the same
        draws whatever the schedule.

        Args:
            params: the parameters at N positions, ``(N, ...)``.
            given: ``(N, C)`` current values there; channels before ``channels`` are final.
            wanted: ``(N, C)`` bool, the entries to draw (others keep ``given``), or
                ``None`` for all of ``channels``.
            channels: the channels of the colour group being drawn.
            noise: ``(N, C)`` uniforms in ``[0, 1)``, one per sub-pixel.
            temperature: > 0; divides the log-probabilities of the levels.

        Returns:
            ``(B, n)`` int64 values of ``channels``.
        """

    def level_log_probs(self, params: Tensor, given: Tensor, channel: int) -> Tensor:
        """``log p`` of every level of ``channel`` at N positions: what a coder needs.

        The default scores each of the K levels with ``log_prob``; a head may compute it
        directly (both library heads do).

        Args:
            params: the parameters at N positions, ``(N, ...)`` (as for ``sample``).
            given: ``(N, C)`` values; the channels before ``channel`` are final.
            channel: the channel whose distribution is wanted.

        Returns:
            ``(N, K)``, in at least float32.
        """
        levels = self.levels
        n = len(given)
        candidates = given.repeat_interleave(levels, 0)
        candidates[:, channel] = torch.arange(levels, device=given.device).repeat(n)
        scores = self.log_prob(params.repeat_interleave(levels, 0), candidates)
        return scores[:, channel].reshape(n, levels)

    def config(self) -> dict[str, Any]:
        """The model-config fields that rebuild this head (``head=`` and its options)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be stored in a config")


class Categorical(OutputHead):
    """A softmax over the ``levels`` values of each sub-pixel.

    The last layer gives ``K`` logits per sub-pixel; parameters are arranged as
    ``(B, C, K, *S)``. With colour groups, sub-pixel c's logits come from the last
    layer's channels of c's group (blocked: ``c*K .. c*K + K - 1``; interleaved:
    ``k*C + c``).

    Args:
        levels: K >= 2.
    """

    def __init__(self, levels: int) -> None:
        self.levels = positive_int("levels", levels, 2)

    def num_params(self, channels: int) -> int:
        return channels * self.levels

    def arrange(self, out: Tensor, channels: int, group_layout: str) -> Tensor:
        b, _, *spatial = out.shape
        if group_layout == "blocked":
            return out.view(b, channels, self.levels, *spatial)
        # interleaved: channel k*C + c belongs to sub-pixel c's group (c mod G)
        return out.view(b, self.levels, channels, *spatial).transpose(1, 2)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        dtype = torch.promote_types(params.dtype, torch.float32)
        with torch.autocast(params.device.type, enabled=False):
            logp = torch.log_softmax(params.to(dtype), dim=2)  # (B, C, K, *S)
            return logp.gather(2, x.long().unsqueeze(2)).squeeze(2)

    def sample(
        self,
        params: Tensor,
        given: Tensor,
        wanted: Tensor | None,
        *,
        channels: slice,
        noise: Tensor,
        temperature: float,
    ) -> Tensor:
        # Sub-pixels are independent given the parameters: one draw for the group.
        return draw_from_log_probs(params[:, channels], temperature, noise[:, channels])

    def level_log_probs(self, params: Tensor, given: Tensor, channel: int) -> Tensor:
        dtype = torch.promote_types(params.dtype, torch.float32)
        return torch.log_softmax(params[:, channel].to(dtype), dim=-1)

    def config(self) -> dict[str, Any]:
        return {"head": "categorical"}

    def __repr__(self) -> str:
        return f"Categorical(levels={self.levels})"


class DiscretizedLogisticMixture(OutputHead):
    """PixelCNN++'s discretized logistic mixture (Salimans et al., 2017).

    The K levels are K equal bins on ``[-1, 1]`` (any K >= 2), the outer two open to
    ``-inf`` and ``+inf``. A pixel's C channels share one mixture component; channel
    c's mean is shifted by ``sum_{c' < c} coeff[c, c'] * x_c'`` (the values scaled to
    ``[-1, 1]``), so the model's trunk runs with ``color_groups=1`` and the head orders
    the channels itself.

    Parameters per pixel, ``P = M * (1 + 2C + C(C-1)/2)``, in this order: M mixture
    logits, C x M means, C x M log-scales (clamped at -7), C(C-1)/2 x M coupling
    coefficients (through ``tanh``; pairs (1,0), (2,0), (2,1), ...).

    Numerically stable in float32: every bin's log-probability is a sum of
    log-sigmoids and ``log(1 - exp(-d))``, with no branch that could turn a gradient
    into NaN.

    Args:
        levels: K >= 2.
        num_mixtures: M >= 1.
    """

    def __init__(self, levels: int, num_mixtures: int = 5) -> None:
        self.levels = positive_int("levels", levels, 2)
        self.num_mixtures = positive_int("num_mixtures", num_mixtures, 1)

    def num_params(self, channels: int) -> int:
        return self.num_mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)

    def default_color_groups(self, channels: int) -> int:
        return 1

    def check_color_groups(self, channels: int, color_groups: int | list[int]) -> None:
        if color_groups != 1:
            raise ValueError(
                f"color_groups must be 1 with the discretized logistic mixture head, which "
                f"orders a pixel's channels itself, but got color_groups={color_groups}"
            )

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m = self.num_mixtures
        b, p, *spatial = params.shape
        per_pixel = p // m - 1  # 2C + C(C-1)/2
        channels = int((math.isqrt(8 * per_pixel + 9) - 3) // 2)
        if self.num_params(channels) != p:
            raise ValueError(
                f"params must have M * (1 + 2C + C(C-1)/2) channels for M={m}, but got {p}"
            )
        rest = params[:, m:].reshape(b, per_pixel, m, *spatial)
        means = rest[:, :channels]  # (B, C, M, *S)
        log_scales = rest[:, channels : 2 * channels].clamp(min=-7.0)
        coeffs = torch.tanh(rest[:, 2 * channels :])  # (B, C(C-1)/2, M, *S)
        return params[:, :m], means, log_scales, coeffs

    def _scaled(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        return x.to(dtype) * (2.0 / (self.levels - 1)) - 1.0

    def _bin_log_prob(self, x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
        """log P(bin x) of a logistic(mean, exp(log_scale)); all arguments broadcast."""
        k = self.levels
        half = 1.0 / (k - 1)
        centre = self._scaled(x, mean.dtype)
        inv_scale = torch.exp(-log_scale)
        upper = inv_scale * (centre - mean + half)  # logit of the CDF at the bin's upper edge
        lower = inv_scale * (centre - mean - half)
        log_cdf_upper = F.logsigmoid(upper)  # first bin: (-inf, upper]
        log_sf_lower = F.logsigmoid(-lower)  # last bin: [lower, inf)
        # sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a)), with
        # a - b = 2 * half / scale: finite for every input, and so is its gradient.
        log_width = math.log(2 * half) - log_scale
        middle = log_cdf_upper + log_sf_lower + _log1mexp(log_width)
        return torch.where(x == 0, log_cdf_upper, torch.where(x == k - 1, log_sf_lower, middle))

    def _coupled_mean(self, means: Tensor, coeffs: Tensor, scaled: Tensor, c: int) -> Tensor:
        """Channel c's means ``(B, M, *S)`` shifted by the earlier channels' values."""
        mean = means[:, c]
        first_pair = c * (c - 1) // 2
        for earlier in range(c):
            mean = mean + coeffs[:, first_pair + earlier] * scaled[:, earlier].unsqueeze(1)
        return mean

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        dtype = torch.promote_types(params.dtype, torch.float32)
        with torch.autocast(params.device.type, enabled=False):
            logits, means, log_scales, coeffs = self._split(params.to(dtype))
            channels = means.shape[1]
            scaled = self._scaled(x, dtype)
            per_channel = torch.stack(
                [
                    self._bin_log_prob(
                        x[:, c].unsqueeze(1),
                        self._coupled_mean(means, coeffs, scaled, c),
                        log_scales[:, c],
                    )
                    for c in range(channels)
                ],
                dim=1,
            )  # (B, C, M, *S)
            # log p(x_0..c) = logsumexp_m(log pi_m + sum_{c' <= c} log p(x_c' | m));
            # each sub-pixel's term is the difference of consecutive prefixes.
            prefix = torch.logsumexp(
                torch.log_softmax(logits, dim=1).unsqueeze(1) + per_channel.cumsum(1), dim=2
            )  # (B, C, *S)
            before = F.pad(prefix[:, :-1], (0, 0) * (prefix.dim() - 2) + (1, 0))
            return prefix - before

    def sample(
        self,
        params: Tensor,
        given: Tensor,
        wanted: Tensor | None,
        *,
        channels: slice,
        noise: Tensor,
        temperature: float,
    ) -> Tensor:
        dtype = torch.promote_types(params.dtype, torch.float32)
        logits, means, log_scales, coeffs = self._split(params.to(dtype))  # no spatial dims
        values = given.clone()
        scaled = self._scaled(values, dtype)
        levels = torch.arange(self.levels, device=params.device)
        weights = torch.log_softmax(logits, dim=1)  # (B, M): the component given x_<c
        for c in range(means.shape[1]):
            mean = self._coupled_mean(means, coeffs, scaled, c)  # (B, M)
            bins = self._bin_log_prob(levels, mean[..., None], log_scales[:, c, :, None])
            log_probs = torch.logsumexp(weights[..., None] + bins, dim=1)  # (B, K)
            log_probs = log_probs - torch.logsumexp(weights, dim=1, keepdim=True)
            draw = draw_from_log_probs(log_probs[:, None], temperature, noise[:, c : c + 1])[:, 0]
            if wanted is not None:
                draw = torch.where(wanted[:, c], draw, given[:, c])
            values[:, c] = draw
            scaled[:, c] = self._scaled(draw, dtype)
            weights = (
                weights + bins.gather(2, draw[:, None, None].expand(-1, bins.shape[1], 1))[..., 0]
            )
        return values[:, channels]

    def level_log_probs(self, params: Tensor, given: Tensor, channel: int) -> Tensor:
        # The K bins of the channel's mixture, its components weighted by how well each
        # explains the channels before it at the pixel.
        dtype = torch.promote_types(params.dtype, torch.float32)
        logits, means, log_scales, coeffs = self._split(params.to(dtype))  # no spatial dims
        scaled = self._scaled(given, dtype)
        weights = torch.log_softmax(logits, dim=1)  # (N, M)
        for c in range(channel):
            mean = self._coupled_mean(means, coeffs, scaled, c)
            weights = weights + self._bin_log_prob(given[:, c, None], mean, log_scales[:, c])
        mean = self._coupled_mean(means, coeffs, scaled, channel)
        levels = torch.arange(self.levels, device=params.device)
        bins = self._bin_log_prob(levels, mean[..., None], log_scales[:, channel, :, None])
        joint = torch.logsumexp(weights[..., None] + bins, dim=1)  # (N, K)
        return joint - torch.logsumexp(weights, dim=1, keepdim=True)

    def config(self) -> dict[str, Any]:
        return {"head": "dmol", "num_mixtures": self.num_mixtures}

    def __repr__(self) -> str:
        return f"DiscretizedLogisticMixture(levels={self.levels}, num_mixtures={self.num_mixtures})"


def _log1mexp(log_d: Tensor) -> Tensor:
    """``log(1 - exp(-d))`` for ``d = exp(log_d) > 0``, stable for tiny and huge d."""
    d = torch.exp(log_d)
    small = d < 1e-2
    # Small d: log d + log((1 - e^-d) / d) = log d - d/2 + d^2/24 - ... (error < 4e-12).
    series = log_d - d / 2 + d * d / 24
    safe = torch.where(small, torch.ones_like(d), d)  # keeps the unused branch finite
    return torch.where(small, series, torch.log(-torch.expm1(-safe)))


HEADS: dict[str, type[OutputHead]] = {
    "categorical": Categorical,
    "dmol": DiscretizedLogisticMixture,
}
