"""Streamed text for streamed token ids, shared by the gateway and the CLI."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Text deltas for token ids that arrive a few at a time.

    Each call decodes only the tokens since the last delta plus the chunk before them
    as context (a token's text can depend on its neighbours, e.g. SentencePiece's
    leading spaces), not the whole sequence, so a long stream costs O(chunk) a round.
    A byte-level token can end inside a UTF-8 character; such text (decoded as U+FFFD)
    is held back until the character completes.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # context starts here
        self.read = 0  # text of ids[:read] has been sent

    def add(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        return self._delta(final=False)

    def flush(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        sent = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if not final and (text.endswith("\ufffd") or len(text) <= len(sent)):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(sent) :]


MAX_STOPS = 16  # stop strings a request may give
MAX_STOP_CHARS = 256  # characters in one


class StopScanner:
    """An output's text, token by token, and where it ends at a stop string.

    The verifier feeds each round's tokens and keeps those up to the one whose text
    completes a stop (``feed``); the gateway feeds the same tokens and streams only text
    that cannot be the start of a stop (``text_out``). Both scan the same text the same
    way, so they agree on where the output ends. Tokens are decoded one at a time only
    when there are stops: a stop that ends inside a round ends the output at its token,
    as if decoded without speculation. Stops count once ``min_tokens`` tokens were
    generated (vLLM's rule).
    """

    def __init__(self, tokenizer, stops: tuple[str, ...] = (), min_tokens: int = 0, earlier: list[int] = ()):
        """``earlier``: output tokens already generated (a resumed stream): a stop
        split across the resume is found."""
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1  # text that may begin a stop
        self.min_tokens = min_tokens
        self.produced = len(earlier)
        self.text = self.detok.add(list(earlier)) if earlier else ""
        self.sent = len(self.text)
        self.matched: str | None = None  # the stop that ended the output
        self.end: int | None = None  # where in ``text`` the output ends (the stop's start)

    def feed(self, tokens: list[int]) -> int:
        """How many of ``tokens`` the output keeps: all, or up to the one that completes a stop."""
        if self.matched is not None:
            return 0
        if not self.stops:
            self.text += self.detok.add(tokens)
            return len(tokens)
        for j, token in enumerate(tokens):
            delta = self.detok.add([token])
            self.produced += 1
            if not delta:
                continue
            start = len(self.text)
            self.text += delta
            if self.produced < self.min_tokens:
                continue
            window = max(0, start - self.hold)  # a stop ending in delta starts here or later
            hits = [(at, stop) for stop in self.stops if (at := self.text.find(stop, window)) >= 0]
            if hits:
                self.end, self.matched = min(hits)
                return j + 1
        return len(tokens)

    def text_out(self, final: bool = False) -> str:
        """Text not yet sent that is safe to send: all of it up to a matched stop; else
        all but the last characters that could still begin one (all of it when ``final``)."""
        if self.matched is not None:
            limit = self.end
        else:
            if final:
                self.text += self.detok.flush()
            limit = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : max(self.sent, limit)]
        self.sent = max(self.sent, limit)
        return out
