"""Print uv's install flags for the package sources pip is configured with.

``make setup`` installs with uv (it unpacks wheels in parallel: the torch wheels, most of the
install, go in seconds rather than minutes) but must take packages from where pip would: a
machine whose pip reads local wheel folders or mirror indexes (pip.conf, ``PIP_*`` variables)
gets the same sources under uv, which reads neither. Standard library only (it runs before
anything is installed). Prints nothing on a machine where pip has no such settings.

    uv pip install $(python .ci/uv_sources.py) -e '.[dev]'
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

#: pip option -> uv flag (``uv pip install`` takes the same names)
OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def pip_settings() -> dict[str, list[str]]:
    """Every value pip's configuration gives each option in :data:`OPTIONS` (files, then env)."""
    settings: dict[str, list[str]] = {name: [] for name in OPTIONS}
    try:
        listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                                text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        listed = ""
    for line in listed.splitlines():
        key, _, value = line.partition("=")
        name = key.rpartition(".")[2]  # global.find-links, :env:.find-links, install.constraint
        if name in settings:
            settings[name] += shlex.split(value.strip().strip("'\""))
    for name in OPTIONS:  # variables pip reads that `pip config list` may not show
        settings[name] += os.environ.get("PIP_" + name.upper().replace("-", "_"), "").split()
    return settings


def uv_flags(settings: dict[str, list[str]]) -> list[str]:
    flags: list[str] = []
    for name, flag in OPTIONS.items():
        for value in dict.fromkeys(settings[name]):  # in order, once each
            if name == "constraint" and not os.path.exists(value):
                continue
            flags += [flag, value]
    if flags:
        # pip takes the best version over all its sources; uv's default stops at the first index
        # that has the package
        flags += ["--index-strategy", "unsafe-best-match"]
    return flags


if __name__ == "__main__":
    print(shlex.join(uv_flags(pip_settings())))
