"""From sampled token pieces to the text a client sees: UTF-8 reassembly and stop strings (pure).

Invariants:

* :class:`Utf8Assembler` never emits a partial UTF-8 sequence: bytes of a character split across
  tokens are held until the character is complete; :meth:`Utf8Assembler.flush` emits what is left
  with U+FFFD replacement, so no byte is silently lost at the end of a generation.
* :class:`StopMatcher` never emits text that could still turn out to be the start of a stop string,
  and never emits a stop string or anything after it. ``emitted + held == everything fed`` until a
  stop is found; after a stop, everything from the stop on is discarded.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

__all__ = ["StopMatcher", "TextStream", "Utf8Assembler"]


class Utf8Assembler:
    """Incremental UTF-8 decoding of token pieces."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        return self._decoder.decode(piece, final=False)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds the earliest stop string in a stream of text fragments.

    ``feed`` returns ``(safe_text, stopped)``: ``safe_text`` may be sent to the client now;
    ``stopped`` is true once a stop string was seen (``safe_text`` then ends right before it).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        buf = self._held + text
        cut = -1
        for stop in self._stops:
            at = buf.find(stop)
            if at != -1 and (cut == -1 or at < cut):
                cut = at
        if cut != -1:
            self._held = ""
            self.stopped = True
            return buf[:cut], True
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """The held text, when the generation ends for another reason than a stop string."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:n]):
                    best = n
                    break
        return best


class TextStream:
    """Pieces in, client text out: UTF-8 assembly followed by stop-string matching."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._utf8 = Utf8Assembler()
        self._stops = StopMatcher(stops)

    def feed(self, piece: bytes) -> tuple[str, bool]:
        return self._stops.feed(self._utf8.feed(piece))

    def flush(self) -> str:
        text, _ = self._stops.feed(self._utf8.flush())
        return text + self._stops.flush()

    @property
    def stopped(self) -> bool:
        return self._stops.stopped
