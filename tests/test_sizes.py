"""Sizes as people write them, in one parser for the CLI and the SDK."""

from __future__ import annotations

import pytest

from cellnode._sizes import format_size, parse_size
from cellnode.exceptions import InvalidArgument


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 * 2**20),
        ("2G", 2 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("1048576", 2**20),
        ("2gb", 2 * 2**30),
        ("1k", 1024),
        ("3 T", 3 * 2**40),
        ("512B", 512),
        (4096, 4096),
    ],
)
def test_size_forms(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("12X", "'12X' is not a size; write bytes, or a number with K, M, G or T (powers of 1024), for example 512M"),
        ("5iB", "'5iB' is not a size"),
        ("-1", "'-1' is not a size"),
        ("", "'' is not a size"),
        (-1, "-1 is not a size"),
        (True, "True is not a size"),
        ("0.1K", "'0.1K' comes to 102.4 bytes, not a whole number"),
    ],
)
def test_bad_sizes(value: str | int, fragment: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_size(value)
    assert fragment in caught.value.message


def test_format_size() -> None:
    assert [format_size(n) for n in (3 * 2**29, 512 * 2**20, 100, 2**40)] == [
        "1.5 GiB",
        "512 MiB",
        "100 bytes",
        "1 TiB",
    ]
