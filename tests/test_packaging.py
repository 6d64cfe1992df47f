"""The package metadata matches what is tested: the core and every extra take ranges, not exact pins, and both
locked environments (requirements/*.lock, the ones `make test` builds and runs) lie inside those ranges."""

from __future__ import annotations

import configparser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# which extras each locked environment installs beside the core
LOCKS = {"robot": ["vla", "ray", "decord", "plot", "test"], "video": ["ray", "eval", "plot", "test"]}


def _requirements(text: str) -> list[Requirement]:
    return [Requirement(line) for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def _setup() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def _locked(env: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / f"{env}.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_core_and_extras_take_ranges():
    cfg = _setup()
    groups = {"core": cfg["options"]["install_requires"], **dict(cfg["options.extras_require"])}
    for group, text in groups.items():
        for req in _requirements(text):
            assert not any(spec.operator == "==" for spec in req.specifier), f"{group}: {req} is an exact pin"
    core = {canonicalize_name(r.name) for r in _requirements(groups["core"])}
    assert {"torch", "transformers"} <= core and not core & {"lerobot", "ray", "lmms-eval", "matplotlib"}


@pytest.mark.parametrize("env", list(LOCKS))
def test_each_locked_environment_lies_inside_the_ranges(env):
    cfg = _setup()
    pins = _locked(env)
    wanted = _requirements(cfg["options"]["install_requires"])
    for extra in LOCKS[env]:
        wanted += _requirements(cfg["options.extras_require"][extra])
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in pins, f"{env}.lock lacks {req.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{env}.lock has {name}=={pins[name]}, not {req}"
    assert ("lerobot" in pins) == (env == "robot") and ("lmms-eval" in pins) == (env == "video")
