"""Byte sizes written the way people write them: `512MiB`, `2GiB`, `1.5GB`, `1000000`."""

import re

_UNIT_BYTES = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_nbytes(size: str | int | float) -> int:
    """Return a byte count from an int or a string such as '2GiB'; raise ValueError if unreadable."""
    if isinstance(size, bool):
        raise ValueError(f"not a byte size: {size!r}")
    if isinstance(size, (int, float)):
        nbytes = int(size)
    else:
        match = _SIZE.match(str(size))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNIT_BYTES:
            raise ValueError(f"not a byte size: {size!r} (examples: 512MiB, 2GiB, 1000000)")
        nbytes = int(float(match.group(1)) * _UNIT_BYTES[unit])
    if nbytes < 0:
        raise ValueError(f"byte size must not be negative: {size!r}")
    return nbytes


def format_nbytes(nbytes: int) -> str:
    """Return a short human form of a byte count, e.g. '1.5 GiB'."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.1f} TiB"
