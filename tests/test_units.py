import pytest

from sti.errors import STIError
from sti.units import parse_bytes, parse_latency


def test_latency():
    assert parse_latency("40ms") == pytest.approx(0.04)
    assert parse_latency("1.5s") == 1.5
    assert parse_latency("800us") == pytest.approx(8e-4)
    assert parse_latency("25") == pytest.approx(0.025)
    for bad in ("", "fast", "-3ms", "0ms"):
        with pytest.raises(STIError):
            parse_latency(bad)


def test_bytes():
    assert parse_bytes("2MB") == 2_000_000
    assert parse_bytes("2MiB") == 2 * 1024 * 1024
    assert parse_bytes("512kb") == 512_000
    assert parse_bytes("4500000") == 4_500_000
    for bad in ("", "lots", "2XB", "0MB"):
        with pytest.raises(STIError):
            parse_bytes(bad)
