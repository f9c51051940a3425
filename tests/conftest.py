"""Hooks for the whole suite.

With ``FXPRUNE_STRICT_SKIPS=1`` (CI's main run, ``.ci/run``) a skip that ``tests/allowed_skips.py`` does not
list fails: a test's skip is reported as a failure, a whole file's skip (``importorskip`` at module level) as a
collection error, after which the other files still run.
"""

import os

import pytest

from tests.allowed_skips import STRICT, fail_unlisted


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
