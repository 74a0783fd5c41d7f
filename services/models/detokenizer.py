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
