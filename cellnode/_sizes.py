"""Sizes in bytes, as people write them: `512M`, `2G`, `1.5GiB`, `1048576`. One parser for the CLI and the SDK.

K, M, G and T are powers of 1024 (as the engine's `--memory` reads them), case-insensitive, with an optional trailing
`B` or `iB`: `2g`, `2GB` and `2GiB` are all 2147483648 bytes.
"""

from __future__ import annotations

import re
from decimal import Decimal

from cellnode.exceptions import InvalidArgument

UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([KMGT])(?:I?B)?|B)?\s*$", re.IGNORECASE)
SIZE_HELP = "Bytes, or a number with K, M, G or T (powers of 1024; case-insensitive, B or iB optional): 512M, 2G."
BAD_SIZE = (
    "{value!r} is not a size; write bytes, or a number with K, M, G or T (powers of 1024), for example 512M or 2G."
)
NOT_WHOLE = "{value!r} comes to {size} bytes, not a whole number; give whole bytes, or a number of a smaller unit."


def parse_size(value: int | str) -> int:
    """Bytes from an int, or a size string such as `512M`, `2G`, `1.5GiB` or `1048576`.

    Raises InvalidArgument naming the value and an example if it is not one, or not a whole number of bytes.

    Example:
        >>> parse_size("1.5GiB")
        1610612736
    """
    if isinstance(value, bool):  # a bool is an int, never a size
        raise InvalidArgument(BAD_SIZE.format(value=value))
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgument(BAD_SIZE.format(value=value))
        return value
    match = SIZE.match(value)
    if match is None:
        raise InvalidArgument(BAD_SIZE.format(value=value))
    number, unit = match.groups()
    size = Decimal(number) * UNITS[(unit or "").upper()]
    if size != size.to_integral_value():
        raise InvalidArgument(NOT_WHOLE.format(value=value, size=size))
    return int(size)


def format_size(size: int) -> str:
    """A byte count for people: `2 GiB`, `1.5 GiB`, `512 MiB`, `100 bytes`.

    Example:
        >>> format_size(1610612736)
        '1.5 GiB'
    """
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            return f"{size / factor:.4g} {unit}"
    return f"{size} bytes"
