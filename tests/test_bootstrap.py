"""Each clone runs its own code: two copies of this checkout bootstrapped against the same cached dependencies
each resolve `streamprune` (and its console script) to themselves. Runs in the environment `make test` built:
the cached dependencies are already there, so each bootstrap only makes a small layered venv (seconds)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERED = Path(sys.prefix, "streamprune-deps")  # written by scripts/bootstrap.sh into a clone's venv


def _copy_checkout(dest: Path) -> None:
    """The files git knows of (tracked and untracked, not ignored): what a clone of this tree holds."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


@pytest.mark.skipif(not LAYERED.exists(), reason="runs in a venv made by scripts/bootstrap.sh (make test)")
def test_two_clones_each_run_their_own_code(tmp_path):
    deps = Path(LAYERED.read_text().strip())
    env_name = "robot" if Path(sys.prefix).name == ".venv-robot" else "video"
    venv = ".venv-robot" if env_name == "robot" else ".venv"
    environ = {**os.environ, "STREAMPRUNE_CACHE": str(deps.parent)}
    seen = {}
    for clone in ("a", "b"):
        root = tmp_path / clone
        _copy_checkout(root)
        subprocess.run(["bash", "scripts/bootstrap.sh", env_name], cwd=root, env=environ, check=True,
                       capture_output=True, timeout=300)
        assert (root / venv / "streamprune-deps").read_text().strip() == str(deps)  # the cache, not a rebuild
        python = root / venv / "bin" / "python"
        where = subprocess.run([str(python), "-P", "-c", "import streamprune; print(streamprune.__file__)"],
                               cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()
        seen[clone] = where
        assert Path(where).is_relative_to(root), where
        version = subprocess.run([str(root / venv / "bin" / "streamprune"), "--version"], check=True,
                                 capture_output=True, text=True).stdout
        assert version.startswith("streamprune ")
    assert seen["a"] != seen["b"]
    # and this checkout's own venv still runs this checkout
    here = subprocess.run([sys.executable, "-P", "-c", "import streamprune; print(streamprune.__file__)"],
                          cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(here).is_relative_to(ROOT)
