"""The skips CI allows on the main environment, each with its reason; any other skip fails the run.

CI's main run (``.ci/run``: the pinned versions of ``constraints.txt`` on a CPU machine) sets
``FXPRUNE_STRICT_SKIPS=1``; then a test that skips for a reason not listed here is reported as failed
(``tests/conftest.py`` installs the hook), so a test cannot stop running unnoticed, say because a dependency
renamed what an ``importorskip`` looks for. The lower bound (``.ci/lower-bound``) runs without it: there old
releases lack features and whole files skip, which its ``-rs`` summary shows.

Example: ``pytest.skip("no CUDA device")`` in ``tests/test_sequential.py`` is allowed on a machine without CUDA;
``pytest.importorskip("timm")`` in ``tests/test_api.py`` fails the strict run, as timm is a ``dev`` extra.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable

STRICT = "FXPRUNE_STRICT_SKIPS"


def _no_cuda() -> bool:
    import torch

    return not torch.cuda.is_available()


@dataclass(frozen=True)
class AllowedSkip:
    """Skips of tests in ``file`` (a path under the repository) whose reason matches ``reason`` (a regular
    expression) are allowed while ``when()`` holds; ``why`` says why CI cannot run them."""

    file: str
    reason: str
    why: str
    when: Callable[[], bool] = lambda: True

    def allows(self, path: str, reason: str) -> bool:
        return (path.replace(os.sep, "/").endswith(self.file) and re.search(self.reason, reason) is not None
                and self.when())


ALLOWED = [
    AllowedSkip("tests/test_calibration.py", r"no CUDA device", "GPU-only: the reconstruction on a CUDA device",
                _no_cuda),
    AllowedSkip("tests/test_layerwise.py", r"needs a CUDA device", "GPU-only: layer-by-layer pruning on CUDA",
                _no_cuda),
    AllowedSkip("tests/test_sequential.py", r"no CUDA device", "GPU-only: sequential pruning on a CUDA device",
                _no_cuda),
    AllowedSkip("tests/test_cli.py", r"Graphviz is not installed",
                "Graphviz is a system program, not a Python package: the drawing falls back to networkx and "
                "matplotlib, which the test before it checks", lambda: shutil.which("neato") is None),
    AllowedSkip("tests/test_rules_routing.py", r"no CPU grouped_mm in this torch",
                "torch's aten._grouped_mm has no CPU kernel in the pinned torch (its fallback variant runs)"),
]


def skip_reason(longrepr) -> str:
    """The reason of a skip report: pytest keeps ``(path, line, "Skipped: reason")``."""
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def unlisted(report) -> str | None:
    """The reason of a skip report (a test's or a whole file's) that none of :data:`ALLOWED` allows, else None.

    A skip is matched by the file of the test (its node id) or the file the skip was raised in, and its reason.
    """
    if not report.skipped or hasattr(report, "wasxfail"):  # an expected failure is no skip
        return None
    reason = skip_reason(report.longrepr)
    paths = [report.nodeid.split("::")[0]]
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        paths.append(str(report.longrepr[0]))
    if any(entry.allows(path, reason) for entry in ALLOWED for path in paths):
        return None
    return reason


def fail_unlisted(report) -> None:
    """Turn a skip that is not allowed into a failure that says why (the strict run's hook)."""
    reason = unlisted(report)
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = (f"skipped ({reason}), and CI's main run allows no such skip: run what this test "
                           f"needs, or list the skip with its reason in tests/allowed_skips.py")
