"""CI's skip watch: with FXPRUNE_STRICT_SKIPS=1 only the skips tests/allowed_skips.py lists pass."""

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.allowed_skips import ALLOWED, STRICT

ROOT = Path(__file__).resolve().parents[1]

SKIPPING = '''
import pytest

def test_listed():
    pytest.skip("no CPU grouped_mm in this torch")

def test_unlisted():
    pytest.importorskip("a_module_nobody_installed")

@pytest.mark.xfail(reason="an expected failure, not a skip")
def test_expected_failure():
    assert False

def test_runs():
    pass
'''


def _run_pytest(folder: Path, strict: bool) -> subprocess.CompletedProcess:
    """pytest in a subprocess on ``folder``, with this suite's hooks (tests/conftest.py) as a plugin."""
    env = {k: v for k, v in os.environ.items() if k != STRICT}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    if strict:
        env[STRICT] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "-p",
                           "tests.conftest", str(folder)], cwd=folder, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_strict_run_fails_a_skip_that_is_not_listed(tmp_path):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    tests = tmp_path / "tests"
    tests.mkdir()
    # named as a listed file: its listed skip passes, an importorskip of a missing module does not
    (tests / "test_rules_routing.py").write_text(SKIPPING)
    (tests / "test_whole_file.py").write_text('import pytest\npytest.importorskip("another_missing_module")\n')

    strict = _run_pytest(tmp_path, strict=True)
    out = strict.stdout
    assert strict.returncode == 1, out
    assert re.search(r"1 failed, 1 passed, 1 skipped, 1 xfailed, 1 error in ", out), out
    assert "FAILED tests/test_rules_routing.py::test_unlisted" in out and "a_module_nobody_installed" in out
    assert "ERROR tests/test_whole_file.py" in out and "list the skip with its reason in tests/allowed_skips.py" in out
    assert "SKIPPED [1] tests/test_rules_routing.py:5: no CPU grouped_mm in this torch" in out

    relaxed = _run_pytest(tmp_path, strict=False)  # the lower bound's run: skips are shown, not failed
    assert relaxed.returncode == 0, relaxed.stdout
    assert re.search(r"1 passed, 3 skipped, 1 xfailed in ", relaxed.stdout), relaxed.stdout


def test_ci_watches_the_main_run_only_and_every_listed_skip_exists():
    run, lower = (ROOT / ".ci" / "run").read_text(), (ROOT / ".ci" / "lower-bound").read_text()
    assert re.search(rf"{STRICT}=1 python -m pytest -q -rfEs\b", run)
    assert STRICT not in lower and "-rfEs" in lower
    for entry in ALLOWED:  # a skip that is gone from its file leaves the list too
        source = (ROOT / entry.file).read_text()
        assert re.search(entry.reason, source), f"{entry.file} no longer skips for {entry.reason!r}"
        assert entry.why


def test_lower_bound_environment_is_locked_at_pyproject_minimums():
    """.ci/lower-bound installs the rest of its environment from .ci/lower-bound-constraints.txt: that file must
    hold exactly pyproject.toml's minimum torch, torchvision and transformers (else CI would fail at its start),
    pin pip, and pin every other line to one version without a local label (PyPI has no "+cu124" builds)."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    minimum = {r.name: Version(s.version) for r in declared for s in r.specifier if s.operator == ">="}
    locked = {}
    for line in (ROOT / ".ci" / "lower-bound-constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and "+" not in version, f"not one plain version: {line!r}"
            locked[name.lower()] = Version(version)
    for name in ("torch", "torchvision", "transformers"):
        assert locked[name] == minimum[name], f"{name}: locked {locked[name]}, pyproject's minimum {minimum[name]}"
    assert "pip" in locked and "hypothesis" in locked
    assert all(locked[name] >= low for name, low in minimum.items() if name in locked)
