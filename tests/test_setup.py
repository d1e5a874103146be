"""``make setup``: uv installs from the package sources pip is configured with (.ci/uv_sources.py)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from kd_experiments.config import PROJECT_ROOT

SCRIPT = PROJECT_ROOT / ".ci" / "uv_sources.py"


@pytest.fixture(scope="module")
def uv_sources():
    spec = importlib.util.spec_from_file_location("uv_sources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pip_sources_become_uv_flags_in_order_once_each(uv_sources, tmp_path) -> None:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.14.1\n")
    settings = {"index-url": [], "extra-index-url": ["file:///a/simple", "file:///b/simple", "file:///a/simple"],
                "find-links": ["/wheels"], "constraint": [str(constraints), str(tmp_path / "absent.txt")]}
    assert uv_sources.uv_flags(settings) == [
        "--extra-index-url", "file:///a/simple", "--extra-index-url", "file:///b/simple",
        "--find-links", "/wheels", "--constraint", str(constraints),  # a constraint file that is absent is left out
        "--index-strategy", "unsafe-best-match"]  # pip's rule: the best version over every source
    assert uv_sources.uv_flags({name: [] for name in uv_sources.OPTIONS}) == []  # pip as shipped: PyPI only


def test_pip_configuration_files_and_variables_are_read(tmp_path) -> None:
    """A pip.conf (PIP_CONFIG_FILE) and PIP_* variables, read through pip itself, as make setup runs it."""
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nextra-index-url = file:///mirror/simple file:///more/simple\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PIP_CONFIG_FILE": str(config),
           "PIP_FIND_LINKS": "/local/wheels"}
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=120,
                            check=True)
    flags = result.stdout.split()
    pairs = list(zip(flags[::2], flags[1::2], strict=True))
    # the machine's own pip settings (site files) may add sources; these must be there, in order
    extra = [value for flag, value in pairs if flag == "--extra-index-url"]
    assert extra[:2] == ["file:///mirror/simple", "file:///more/simple"]
    assert ("--find-links", "/local/wheels") in pairs
    assert pairs[-1] == ("--index-strategy", "unsafe-best-match")
