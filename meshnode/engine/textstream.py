"""Turns per-token byte pieces into TokenChunks: whole UTF-8 only, stop strings cut.

Pure and synchronous, so any engine (and the tests) can drive it token by token.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from meshnode.engine.base import TokenChunk


class TextAssembler:
    """Accumulates token pieces and releases text that is safe to show.

    Text is held back while it ends inside a UTF-8 sequence, or while its tail could be the
    start of a stop string. Tokens that produced held-back text are counted into the next
    chunk that is released; ``unreleased_tokens`` says how many never were (the stop string
    itself, a trailing partial character).
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        # "replace" turns bytes that can never form a character into U+FFFD, while an
        # incomplete but still valid tail stays buffered inside the decoder.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._held = ""
        self._held_tokens = 0
        self.stopped = False

    @property
    def unreleased_tokens(self) -> int:
        return self._held_tokens

    def feed(self, piece: bytes) -> TokenChunk | None:
        """Add one token's bytes; return the text that became safe to release, if any.

        After a stop string is seen, ``stopped`` is True and further feeds are ignored.
        """
        if self.stopped:
            return None
        self._held_tokens += 1
        self._held += self._decoder.decode(piece)
        if not self._held:
            return None
        if self._stop:
            cut = self._first_stop(self._held)
            if cut is not None:
                self.stopped = True
                return self._release(self._held[:cut], rest="")
            keep = self._stop_prefix_len(self._held)
            return self._release(
                self._held[: len(self._held) - keep], rest=self._held[len(self._held) - keep :]
            )
        return self._release(self._held, rest="")

    def finish(self) -> TokenChunk | None:
        """End of generation: release text held for a possible stop string.

        A trailing incomplete UTF-8 sequence is dropped rather than shown as U+FFFD.
        """
        if self.stopped:
            return None
        return self._release(self._held, rest="")

    def _release(self, text: str, *, rest: str) -> TokenChunk | None:
        self._held = rest
        if not text:
            return None
        chunk = TokenChunk(text=text, n_tokens=self._held_tokens)
        self._held_tokens = 0
        return chunk

    def _first_stop(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
