"""Fixtures shared by the test files.

``no_network``: a test that builds a model of another library (ultralytics, diffusers, open_clip ...) from its
config must not reach the network, even where the library would swallow the failure (a DNS check, a font or
weights download): every socket connection and name lookup made during the test is recorded through Python's
audit hooks (which see attempts a ``try`` later hides) and fails the test.

Example::

    def test_builds_offline(no_network):
        model = build_from_yaml("yolov8n.yaml")
"""

from __future__ import annotations

import sys

import pytest

_NETWORK_EVENTS = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                   "urllib.Request")
_attempts: list[tuple] = []
_hook_installed = False


def _record(event: str, args: tuple) -> None:
    if event in _NETWORK_EVENTS:
        _attempts.append((event, args))


@pytest.fixture
def no_network():
    """Fail the test if anything in it tried to reach the network (recorded, not blocked)."""
    global _hook_installed
    if not _hook_installed:  # audit hooks cannot be removed: one for the whole session
        sys.addaudithook(_record)
        _hook_installed = True
    start = len(_attempts)
    yield
    tried = _attempts[start:]
    assert not tried, f"the test tried to reach the network: {tried[:3]}"
