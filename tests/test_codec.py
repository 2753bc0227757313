"""maskedconv.codec: exact round trips, files at the model's NLL, and no silent failure."""

from __future__ import annotations

import math
import sys
import zlib

import pytest
import torch

from maskedconv import GatedPixelCNN, PixelCNN

pytest.importorskip("constriction", reason="the codec extra is not installed")

from maskedconv import codec
from maskedconv.codec import CodecError

MODELS = {
    "binary": lambda: PixelCNN(1, 2, hidden_channels=8, num_layers=2, kernel_size=3),
    "rgb-4-levels-blocked": lambda: PixelCNN(3, 4, hidden_channels=12, num_layers=2),
    "rgb-4-levels-interleaved": lambda: PixelCNN(
        3, 4, hidden_channels=12, num_layers=2, group_layout="interleaved"
    ),
    "rgb-one-group": lambda: PixelCNN(3, 4, hidden_channels=12, num_layers=2, color_groups=1),
    "gray-512-levels": lambda: PixelCNN(1, 512, hidden_channels=8, num_layers=1, kernel_size=3),
    "gray-dmol": lambda: PixelCNN(1, 256, hidden_channels=8, num_layers=2, head="dmol"),
    "rgb-dmol": lambda: PixelCNN(
        3, 256, hidden_channels=12, num_layers=2, head="dmol", num_mixtures=2
    ),
    "gated-raster": lambda: GatedPixelCNN(1, 4, hidden_channels=8, num_layers=3),
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    with torch.no_grad():  # sharper than at initialisation, so that rates vary
        for p in model.parameters():
            p.mul_(3)
    return model.eval()


def _images(model: torch.nn.Module, batch: int, size: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    shape = (batch, model.in_channels, size, size)
    return torch.randint(0, model.levels, shape, generator=generator)


def _nll_bytes(model: torch.nn.Module, x: torch.Tensor, **kwargs) -> float:
    with torch.no_grad():
        return -float(model.log_prob(x, **kwargs).double().sum()) / math.log(2) / 8


@pytest.mark.parametrize("name", list(MODELS))
def test_every_head_and_layout_round_trips_exactly(name: str) -> None:
    model = _model(name)
    x = _images(model, 5)
    data = codec.encode(model, x, block_size=2)
    assert torch.equal(codec.decode(model, data), x)
    # The stream is the model's NLL and the fixed costs: a 42-byte header, a CRC per
    # block, a CRC of it all, at most a word the coder flushes; frequencies cost < 0.5%.
    overhead = 42 + 4 * 3 + 4 + 8
    assert len(data) <= 1.005 * _nll_bytes(model, x) + overhead


def test_the_file_is_as_small_as_the_nll_on_many_images() -> None:
    # The rate target: bytes <= 1.005 x NLL + 64 per file, at a size where 0.5% is more
    # than the fixed costs.
    model = _model("binary")
    x = _images(model, 512, size=8)
    data = codec.encode(model, x, block_size=256)
    assert torch.equal(codec.decode(model, data), x)
    nll = _nll_bytes(model, x)
    assert nll > 10_000
    assert len(data) <= 1.005 * nll + 64, (len(data), nll)


def test_labels_and_maps_condition_the_code() -> None:
    torch.manual_seed(0)
    model = GatedPixelCNN(
        1, 16, hidden_channels=8, num_layers=2, num_classes=3, cond_channels=2, input="embedding"
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # conditioning weights start at zero
    x = _images(model, 4, size=7)
    labels = torch.tensor([0, 1, 2, 1])
    cond = torch.randn(4, 2, 3, 3)
    data = codec.encode(model, x, labels=labels, cond=cond, block_size=3)
    assert torch.equal(codec.decode(model, data, labels=labels.int(), cond=cond), x)
    with pytest.raises(CodecError, match="labels differ"):
        codec.decode(model, data, labels=torch.tensor([0, 1, 2, 2]), cond=cond)
    with pytest.raises(CodecError, match="cond differ"):
        codec.decode(model, data, labels=labels, cond=cond + 1e-6)
    with pytest.raises(CodecError, match=r"labels differ .*not given"):
        codec.decode(model, data, cond=cond)


def test_the_layout_comes_from_the_stream_and_threads_do_not_matter() -> None:
    # Encoded in blocks of 64 with 2 threads, decoded with 1: the decoder takes the
    # blocks from the header, whatever the caller does.
    model = _model("binary")
    x = _images(model, 70, size=7)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        data = codec.encode(model, x, block_size=64)
        torch.set_num_threads(1)
        assert torch.equal(codec.decode(model, data), x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(codec.decode(model, codec.encode(model, x[:1])), x[:1])


def test_both_schedules_decode_and_are_stored() -> None:
    model = _model("binary")
    x = _images(model, 3, size=7)
    raster_data = codec.encode(model, x, schedule="raster")
    front_data = codec.encode(model, x, schedule="wavefront")
    assert raster_data != front_data  # the same symbols, coded in another order
    for data in (raster_data, front_data):
        assert torch.equal(codec.decode(model, data), x)
    with pytest.raises(
        ValueError,
        match=r"schedule must be one of \('auto', 'raster', 'wavefront', 'checkerboard', 'group-c",
    ):
        codec.encode(model, x, schedule="diagonal")


def test_a_stream_of_another_model_is_refused() -> None:
    model = _model("binary")
    x = _images(model, 2)
    data = codec.encode(model, x)
    other = _model("binary")
    with torch.no_grad():
        other.trunk[0].conv.weight[0, 0, 0, 0] += 1e-7
    with pytest.raises(CodecError, match="encoded with another model"):
        codec.decode(other, data)
    with pytest.raises(CodecError, match="encoded with another model"):
        codec.decode(_model("gated-raster"), data)


def test_every_truncation_and_every_single_bit_flip_is_detected() -> None:
    model = _model("rgb-4-levels-blocked")
    x = _images(model, 3, size=4)
    data = codec.encode(model, x, block_size=2)
    for length in range(len(data)):
        with pytest.raises(CodecError):
            codec.decode(model, data[:length])
    for bit in range(8 * len(data)):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(CodecError):
            codec.decode(model, bytes(flipped))
    with pytest.raises(CodecError, match="not a maskedconv stream"):
        codec.decode(model, b"\x89PNG\r\n\x1a\n")
    newer = bytearray(data)
    newer[3] = 2
    with pytest.raises(CodecError, match="format version 2; this maskedconv reads version 1"):
        codec.decode(model, bytes(newer))
    # Words appended after a valid stream, with its CRC made to match (the images would
    # still decode right; the coder sees the extra words).
    body = data[:-4] + (123456).to_bytes(4, "little") + (7).to_bytes(4, "little")
    longer = body + zlib.crc32(body).to_bytes(4, "little")
    with pytest.raises(CodecError, match="more data than its images"):
        codec.decode(model, longer)


def test_a_decode_that_computes_other_probabilities_fails_loudly(monkeypatch) -> None:
    # What another device or torch version could do: one probability a little off. The
    # block's CRC catches it; no wrong image comes back.
    model = _model("binary")
    x = _images(model, 4)
    data = codec.encode(model, x, block_size=2)
    import maskedconv._codec as implementation

    original = implementation._level_log_probs

    def slightly_off(*args, **kwargs):
        log_probs = original(*args, **kwargs)
        return log_probs + torch.tensor([0.0, 0.05], dtype=log_probs.dtype)

    monkeypatch.setattr(implementation, "_level_log_probs", slightly_off)
    with pytest.raises(CodecError, match=r"block 0 \(images 0 to 1\) decoded to other images"):
        codec.decode(model, data)


def test_frequencies_are_exact_integers_with_no_level_at_zero() -> None:
    log_probs = torch.tensor([[0.0, -100.0, float("-inf")], [1.0, 2.0, 3.0]])
    freq = codec.frequencies(log_probs)
    assert freq.dtype == torch.int64
    assert freq.sum(1).tolist() == [1 << codec.PRECISION] * 2
    assert int(freq.min()) >= 1
    assert torch.equal(freq, codec.frequencies(log_probs - 7))  # normalised or not
    with pytest.raises(ValueError, match="NaN"):
        codec.frequencies(torch.tensor([[0.0, float("nan")]]))


def test_bad_input_is_refused_clearly(monkeypatch) -> None:
    model = _model("binary")
    with pytest.raises(TypeError, match="x must be an integer image tensor"):
        codec.encode(model, torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, H, W\)"):
        codec.encode(model, torch.zeros(1, 3, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="x must hold at least one image"):
        codec.encode(model, torch.zeros(0, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"values in \[0, 2\).*values in \[2, 2\]"):
        codec.encode(model, torch.full((1, 1, 4, 4), 2))
    with pytest.raises(ValueError, match="block_size must be"):
        codec.encode(model, torch.zeros(1, 1, 4, 4, dtype=torch.long), block_size=0)
    with pytest.raises(TypeError, match="model must be a model of this library"):
        codec.encode(torch.nn.Conv2d(1, 2, 3), torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="data must be bytes"):
        codec.decode(model, "MCZ")
    monkeypatch.setitem(sys.modules, "constriction", None)
    with pytest.raises(ImportError, match=r"pip install 'maskedconv\[codec\]'"):
        codec.encode(model, torch.zeros(1, 1, 4, 4, dtype=torch.long))


def test_progress_shows_the_blocks(capsys) -> None:
    model = _model("binary")
    x = _images(model, 5)
    data = codec.encode(model, x, block_size=2, progress=True)
    assert torch.equal(codec.decode(model, data, progress=True), x)
    err = capsys.readouterr().err
    assert "encoding 5 images" in err and "decoding 5 images" in err


@pytest.mark.parametrize("channels", [1, 3])
def test_each_heads_level_log_probs_are_its_log_prob_of_every_level(channels: int) -> None:
    # The library heads compute the distribution directly; the base class scores every
    # level with log_prob. Both must agree, or the file would not be the NLL.
    from maskedconv import Categorical, DiscretizedLogisticMixture, OutputHead

    torch.manual_seed(0)
    given = torch.randint(0, 256, (6, channels))
    for head, params in (
        (
            DiscretizedLogisticMixture(256, 3),
            torch.randn(
                6, 3 * (1 + 2 * channels + channels * (channels - 1) // 2), dtype=torch.float64
            ),
        ),
        (Categorical(256), torch.randn(6, channels, 256, dtype=torch.float64)),
    ):
        for c in range(channels):
            direct = head.level_log_probs(params, given, c)
            scored = OutputHead.level_log_probs(head, params, given, c)
            torch.testing.assert_close(direct, scored, rtol=0, atol=1e-12)
            assert torch.allclose(direct.exp().sum(1), torch.ones(6, dtype=torch.float64))


def test_a_head_of_your_own_is_coded_through_its_log_prob() -> None:
    from maskedconv import OutputHead

    class Bernoulli(OutputHead):
        levels = 2

        def num_params(self, channels):
            return channels

        def log_prob(self, params, x):
            return -torch.nn.functional.binary_cross_entropy_with_logits(
                params, x.to(params.dtype), reduction="none"
            )

        def sample(self, params, given, wanted, *, channels, noise, temperature):
            p = torch.sigmoid(params[:, channels] / temperature)
            return (noise[:, channels] < p).long()

    torch.manual_seed(0)
    model = PixelCNN(1, 2, hidden_channels=8, num_layers=2, kernel_size=3, head=Bernoulli()).eval()
    x = _images(model, 4)
    data = codec.encode(model, x)
    assert torch.equal(codec.decode(model, data), x)
    assert len(data) <= 1.005 * _nll_bytes(model, x) + 42 + 4 + 4 + 8
