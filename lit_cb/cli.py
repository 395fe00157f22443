"""The ``lightning`` / ``lit-cb`` command: ``lightning run recipes/<name>.py [--config X.yaml] [k=v ...]``.

Lightning 2.6 ships no ``lightning`` command, so lit_cb provides one with the promised shape. A
recipe is a Python file with a ``main(cfg)`` function, a ``DEFAULT_CONFIG`` path and optionally a
``CONFIG_CLASS`` (default :class:`lit_cb.config.RunConfig`) that its YAML is parsed into.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from lit_cb.config import RunConfig, load_config


def load_recipe(path: str | Path) -> ModuleType:
    p = Path(path)
    if not p.is_file() or p.suffix != ".py":
        raise FileNotFoundError(f"recipe {path} is not an existing .py file")
    spec = importlib.util.spec_from_file_location(f"lit_cb_recipe_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for attr in ("main", "DEFAULT_CONFIG"):
        if not hasattr(module, attr):
            raise AttributeError(f"recipe {path} defines no {attr}")
    return module


def run_recipe(recipe_path: str | Path, argv: list[str]) -> dict:
    """Parse ``[--config X] [overrides]`` for a recipe file and run it."""
    recipe = load_recipe(recipe_path)
    parser = argparse.ArgumentParser(prog=f"lightning run {recipe_path}")
    parser.add_argument("--config", default=None, help=f"YAML config (default: {recipe.DEFAULT_CONFIG})")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. recovery.max_steps=50")
    args = parser.parse_args(argv)
    cfg = load_config(args.config or recipe.DEFAULT_CONFIG, args.overrides, getattr(recipe, "CONFIG_CLASS", RunConfig))
    return recipe.main(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] != "run" or len(argv) < 2:
        print(
            f"usage: lightning run <recipe.py> [--config X.yaml] [key=value ...]; got {' '.join(argv)}", file=sys.stderr
        )
        return 2
    try:
        run_recipe(argv[1], argv[2:])
    except (ValueError, FileNotFoundError, AttributeError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
