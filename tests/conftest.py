"""Hooks and fixtures for the whole suite.

With ``FXPRUNE_STRICT_SKIPS=1`` (CI's main run, ``.ci/run``) a skip that ``tests/allowed_skips.py`` does not
list fails: a test's skip is reported as a failure, a whole file's skip (``importorskip`` at module level) as a
collection error, after which the other files still run.

``no_network``: a test that builds a model of another library (ultralytics, diffusers, open_clip ...) from its
config must not reach the network, even where the library would swallow the failure (a DNS check, a font or
weights download): every socket connection and name lookup made during the test is recorded through Python's
audit hooks (which see attempts a ``try`` later hides) and fails the test.

Example::

    def test_builds_offline(no_network):
        model = build_from_yaml("yolov8n.yaml")
"""

from __future__ import annotations

import os
import sys

import pytest

from tests.allowed_skips import STRICT, fail_unlisted

_NETWORK_EVENTS = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyname_ex",
                   "urllib.Request")
_attempts: list[tuple] = []
_hook_installed = False


def pytest_configure(config):
    if os.environ.get(STRICT):  # a file whose skip is not allowed must not stop the other files from running
        config.option.continue_on_collection_errors = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if os.environ.get(STRICT):
        fail_unlisted(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    if os.environ.get(STRICT):
        fail_unlisted(outcome.get_result())


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
