"""Incremental detokenization and stop strings, for streaming.

Only a short window of recent tokens is decoded per new token (the prefix/read offsets of vLLM),
and text that ends in an incomplete UTF-8 character is held back until it completes. Text that
could still turn out to be the start of a stop string is held back too, so a stop string never
leaks into a stream.
"""

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback_chars = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.emitted_chars = 0
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> None:
        """Add one token; afterwards `stopped` tells whether a stop string appeared."""
        self.token_ids.append(token_id)
        prefix_text = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.token_ids[self.prefix_offset:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return
        delta = new_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        search_from = max(0, len(self.text) - self.holdback_chars)
        self.text += delta
        for stop in self.stop:
            at = self.text.find(stop, search_from)
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True

    def take_delta(self, final: bool) -> str:
        """New text that is safe to show; on `final`, everything that is left."""
        end = len(self.text) if final or self.stopped else max(self.emitted_chars, len(self.text) - self.holdback_chars)
        delta = self.text[self.emitted_chars:end]
        self.emitted_chars = end
        return delta
