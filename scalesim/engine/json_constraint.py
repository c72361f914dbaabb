"""JSON mode: a character-level pushdown automaton that accepts exactly the prefixes of a JSON object.

`JsonPrefix.accepts(text)` says whether appending `text` keeps the output a prefix of valid JSON;
`advance(text)` appends it. The sampler keeps only candidate tokens that are accepted, and once
the top-level object is closed only an end-of-sequence token may follow.
"""

from dataclasses import dataclass, field

WHITESPACE = " \t\n\r"
DIGITS = "0123456789"  # str.isdigit() would also take "²" and "٣"
MAX_WHITESPACE_RUN = 8  # keep a model from padding the output with blank lines forever
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
_NUMBER_END_OK = {"zero", "int", "frac", "exp"}


@dataclass
class JsonPrefix:
    stack: list[str] = field(default_factory=list)  # "{" or "[" per open container
    mode: str = "top"  # top, value, key_or_end, key, colon, after_value, string, escape, unicode, number, literal, done
    in_key: bool = False
    pending: str = ""  # the rest of a literal, or hex digits still due after \u
    number: str = ""  # number sub-state: minus, zero, int, dot, frac, e, esign, exp
    whitespace_run: int = 0

    @property
    def done(self) -> bool:
        return self.mode == "done"

    def copy(self) -> "JsonPrefix":
        return JsonPrefix(list(self.stack), self.mode, self.in_key, self.pending, self.number, self.whitespace_run)

    def accepts(self, text: str) -> bool:
        probe = self.copy()
        return bool(text) and all(probe._feed(ch) for ch in text)

    def advance(self, text: str) -> None:
        for ch in text:
            if not self._feed(ch):
                raise ValueError(f"text {text!r} breaks the JSON prefix")

    # --- the automaton -------------------------------------------------------------------------
    def _close_value(self) -> None:
        self.mode = "after_value" if self.stack else "done"

    def _start_value(self, ch: str) -> bool:
        if ch == "{":
            self.stack.append("{")
            self.mode = "key_or_end"
        elif ch == "[":
            self.stack.append("[")
            self.mode = "value_or_end"
        elif ch == '"':
            self.mode, self.in_key = "string", False
        elif ch in _LITERALS:
            self.mode, self.pending = "literal", _LITERALS[ch]
        elif ch == "-" or ch in DIGITS:
            self.mode = "number"
            self.number = "minus" if ch == "-" else "zero" if ch == "0" else "int"
        else:
            return False
        return True

    def _feed(self, ch: str) -> bool:
        mode = self.mode
        if ch in WHITESPACE and mode not in ("string", "escape", "unicode", "number", "literal"):
            if mode == "done":
                return False
            self.whitespace_run += 1
            return self.whitespace_run <= MAX_WHITESPACE_RUN
        if mode == "number":
            return self._feed_number(ch)
        self.whitespace_run = 0
        if mode == "top":
            return ch == "{" and self._start_value(ch)
        if mode == "value":
            return self._start_value(ch)
        if mode == "value_or_end":
            if ch == "]":
                self.stack.pop()
                self._close_value()
                return True
            return self._start_value(ch)
        if mode in ("key_or_end", "key"):
            if ch == "}" and mode == "key_or_end":
                self.stack.pop()
                self._close_value()
                return True
            if ch == '"':
                self.mode, self.in_key = "string", True
                return True
            return False
        if mode == "colon":
            if ch == ":":
                self.mode = "value"
                return True
            return False
        if mode == "after_value":
            top = self.stack[-1]
            if ch == ",":
                self.mode = "key" if top == "{" else "value"
                return True
            if ch == ("}" if top == "{" else "]"):
                self.stack.pop()
                self._close_value()
                return True
            return False
        if mode == "string":
            if ch == '"':
                if self.in_key:
                    self.mode = "colon"
                else:
                    self._close_value()
                return True
            if ch == "\\":
                self.mode = "escape"
                return True
            return ord(ch) >= 0x20
        if mode == "escape":
            if ch == "u":
                self.mode, self.pending = "unicode", "xxxx"
                return True
            if ch in '"\\/bfnrt':
                self.mode = "string"
                return True
            return False
        if mode == "unicode":
            if ch not in "0123456789abcdefABCDEF":
                return False
            self.pending = self.pending[1:]
            self.mode = "unicode" if self.pending else "string"
            return True
        if mode == "literal":
            if not self.pending or ch != self.pending[0]:
                return False
            self.pending = self.pending[1:]
            if not self.pending:
                self._close_value()
            return True
        return False  # done: nothing may follow the object

    def _feed_number(self, ch: str) -> bool:
        state = self.number
        transitions = {
            "minus": {"0": "zero", "digit": "int"},
            "zero": {".": "dot", "e": "e"},
            "int": {"digit": "int", ".": "dot", "e": "e"},
            "dot": {"digit": "frac"},
            "frac": {"digit": "frac", "e": "e"},
            "e": {"sign": "esign", "digit": "exp"},
            "esign": {"digit": "exp"},
            "exp": {"digit": "exp"},
        }[state]
        kind = "0" if ch == "0" and "0" in transitions else "digit" if ch in DIGITS else \
            "e" if ch in "eE" else "sign" if ch in "+-" else ch
        if kind in transitions:
            self.number = transitions[kind]
            return True
        if state not in _NUMBER_END_OK:
            return False
        self._close_value()  # the number ended: this character belongs to what follows it
        return self._feed(ch)
