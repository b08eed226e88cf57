"""``serving.ports.free_port``: a port a server can bind later, outside the range outgoing connections use."""

import socket

import pytest

from serving import ports


@pytest.mark.parametrize("span", [1, 64])
def test_free_port_is_below_the_ephemeral_range_and_its_span_binds(span):
    lo, _ = ports.ephemeral_range()
    for _ in range(20):
        port = ports.free_port(span=span)
        assert ports.LOWEST <= port and port + span <= lo
        assert all(ports.bindable(p) for p in range(port, port + span))


def test_free_port_skips_a_port_in_use(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        picks = iter([taken, taken + 1])

        class Fixed:
            def randrange(self, a, b):
                return next(picks)

        monkeypatch.setattr(ports.random, "SystemRandom", Fixed)
        assert not ports.bindable(taken)
        assert ports.free_port() == taken + 1


def test_ephemeral_range_falls_back_when_unreadable(tmp_path):
    assert ports.ephemeral_range(str(tmp_path / "missing")) == (32768, 60999)
    (tmp_path / "r").write_text("40000\t50000\n")
    assert ports.ephemeral_range(str(tmp_path / "r")) == (40000, 50000)
