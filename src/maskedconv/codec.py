"""Lossless compression with any model of this library: files as small as its NLL.

``encode(model, x)`` turns integer images (or VQ code maps) into bytes with a range coder
driven by the model's probabilities; ``decode(model, data)`` gives them back, exactly.
The coder is ``constriction``'s (the optional extra ``maskedconv[codec]``).

Why decodes cannot silently go wrong:

* the encoder and the decoder compute every probability through the same evaluator,
  schedule, batch layout (stored in the stream) and sequence of calls, and turn it into
  integer frequencies in one function (``frequencies``): a decode recomputes exactly what
  the encoder used, whatever batch size the caller has;
* the stream carries a header (format version, a digest of the model's config and
  weights, of the labels and of the conditioning map, the shape, colour order, schedule
  and dtype) with its own CRC, a CRC of every block's decoded images, and a CRC of the
  whole stream: another model, a wrong label or map, a truncated or corrupted stream, or
  a decode that computes other probabilities (another device kind or torch version) each
  raise ``CodecError`` saying which; no garbage image is ever returned.

Not covered: a stream decoded on another kind of device or another torch version than it
was encoded on may compute other float values and then fails (with ``CodecError``)
rather than decoding; see docs/compression.md.
"""

from ._codec import PRECISION, CodecError, decode, encode, frequencies

__all__ = ["PRECISION", "CodecError", "decode", "encode", "frequencies"]
