"""relay.units: durations and sizes as written in the config file."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config.units import format_duration, format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("2s", 2.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("5d", 432000.0),
        ("0.5s", 0.5),
        ("1.5h", 5400.0),
        (" 10m ", 600.0),
        ("30", 30.0),
        (45, 45.0),
        (2.5, 2.5),
        ("0s", 0.0),
    ],
)
def test_parse_duration(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5x", "m", "-1s", "1 hour", "1h30m", "5M", True, None, [], -3])
def test_parse_duration_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="must be"):
        parse_duration(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("25MiB", 25 * 1024 * 1024),
        ("512KiB", 512 * 1024),
        ("1GiB", 1024**3),
        ("25mib", 25 * 1024 * 1024),
        ("1000", 1000),
        ("100B", 100),
        (4096, 4096),
        ("0", 0),
    ],
)
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["25MB", "25 megabytes", "1.5MiB", "KiB", "", -1, 2.5, True, None])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="must"):
        parse_size(bad)  # type: ignore[arg-type]


@given(st.integers(min_value=0, max_value=10**7), st.sampled_from(["s", "m", "h", "d", ""]))
def test_duration_round_trip(number: int, unit: str) -> None:
    seconds = parse_duration(f"{number}{unit}")
    assert seconds == number * {"s": 1, "m": 60, "h": 3600, "d": 86400, "": 1}[unit]
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from(["", "B", "KiB", "MiB", "GiB"]))
def test_size_round_trip(number: int, unit: str) -> None:
    size = parse_size(f"{number}{unit}")
    scale = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}[unit]
    assert size == number * scale
    assert parse_size(format_size(size)) == size


@given(st.floats(min_value=0, max_value=1e9, allow_nan=False))
def test_format_duration_of_any_float_parses_back(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds, abs=0.001)
