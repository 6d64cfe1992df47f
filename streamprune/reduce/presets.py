"""Method presets: YAML files under `configs/methods/` (or anywhere) naming a method and its options.

    method: dycoke        # a registry name
    retain: 0.25          # optional: the ratio this preset is meant for
    options: {k: 0.7}     # optional: the method's own options (its DEFAULTS fill the rest)

`--method` takes a registry name, a preset's name in `configs/methods/`, or a path to a preset file.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from streamprune.errors import ConfigError
from streamprune.reduce import METHODS, get_method

PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "methods"


def load_preset(path: str | Path) -> tuple[str, dict, float | None]:
    """A preset file → (method name, options, retain or None)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read method preset {str(path)!r}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"method preset {str(path)!r} must be a mapping with a 'method:' key")
    name = str(data["method"])
    get_method(name)
    options = data.get("options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"'options' in {str(path)!r} must be a mapping")
    retain = data.get("retain")
    return name, options, None if retain is None else float(retain)


def resolve_method(value: str) -> tuple[str, dict, float | None]:
    """`--method VALUE` → (name, options, preset retain or None)."""
    if value in METHODS:
        return value, {}, None
    candidate = Path(value)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.exists():
            raise ConfigError(f"method preset not found: {value}")
        return load_preset(candidate)
    if (PRESET_DIR / f"{value}.yaml").exists():
        return load_preset(PRESET_DIR / f"{value}.yaml")
    raise ConfigError(f"unknown method {value!r}; choose one of: {', '.join(sorted(METHODS))} "
                      "(or a preset .yaml file)")
