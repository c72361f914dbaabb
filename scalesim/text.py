"""What text callers may send: valid Unicode everywhere, and a documented alphabet for agent ids.

Python strings can hold lone surrogates (JSON allows the escape `"\\ud800"`), which no tokenizer,
hash or SQLite column can take; they are refused where text enters, naming the field.
"""

from scalesim.errors import InvalidRequestError

MAX_AGENT_ID_CHARS = 256
AGENT_ID_RULE = (f"1-{MAX_AGENT_ID_CHARS} printable characters (letters, digits, punctuation, symbols and "
                 "spaces of any script; no control characters such as newlines or tabs)")


def is_valid_text(text: str) -> bool:
    """True unless `text` holds a lone surrogate (which cannot be encoded as UTF-8)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def first_invalid_text(value, path: tuple = ()) -> str | None:
    """The dotted path ('messages.0.content') of the first string in a parsed JSON value that is
    not valid text, keys included; None when all are valid."""
    if isinstance(value, str):
        return None if is_valid_text(value) else ".".join(map(str, path)) or "body"
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and not is_valid_text(key):
                return ".".join(map(str, (*path, "<key>")))
            found = first_invalid_text(item, (*path, key))
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = first_invalid_text(item, (*path, index))
            if found is not None:
                return found
    return None


def check_text(text: str, what: str) -> None:
    """InvalidRequestError naming `what` unless `text` is valid text."""
    if not is_valid_text(text):
        raise InvalidRequestError(f"{what} holds a lone surrogate (invalid Unicode); send valid UTF-8 text")


def check_agent_id(agent_id) -> None:
    """InvalidRequestError unless `agent_id` follows AGENT_ID_RULE (surrogates are not printable)."""
    if not isinstance(agent_id, str) or not 0 < len(agent_id) <= MAX_AGENT_ID_CHARS or not agent_id.isprintable():
        raise InvalidRequestError(f"agent_id must be {AGENT_ID_RULE}; got {agent_id!r:.300}")
