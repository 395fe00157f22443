"""The ``lit_cb`` command (also installed as ``lit-cb`` and ``lightning``): one command per stage.

Parsing, ``--help`` and config validation import neither torch nor Lightning (the config
dataclasses live in :mod:`lit_cb.configs`); a command imports the heavy modules only once its
config is valid, so help answers at once and a typo fails in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import yaml

from lit_cb.config import read_config_dict
from lit_cb.configs.evaluate import EvaluateConfig
from lit_cb.configs.report import ReportConfig
from lit_cb.configs.run import RunConfig
from lit_cb.configs.schema import _lookup
from lit_cb.typed_config import FieldHelp, build

COMMANDS: dict[str, str] = {
    "run": "run a recipe end to end: compress, recover, evaluate, save (what `lightning run` does)",
    "compress": "compress a model and save it, without recovery (recovery.max_steps=0)",
    "recover": "fine-tune a compressed run: resumes from its finished blocks (and last.ckpt), then saves",
    "evaluate": "perplexity of a lit_cb, AQLM or any HF model folder, by one protocol (a run's own by default)",
    "report": "comparison report: fp16, bitsandbytes NF4/FP4, QLoRA, RTN and GPTQ rows under one protocol",
    "export": "export a compressed model to another format (lit_cb.export)",
    "generate": "generate text with a saved model (lit_cb.generate)",
    "chat": "chat with a saved model, one message per input line (lit_cb.chat)",
}
# Commands that hand their whole argument list to another module's ``main(argv) -> int``.
DELEGATED = {"export": "lit_cb.export", "generate": "lit_cb.generate", "chat": "lit_cb.chat"}
EXAMPLES = """\
examples:
  {prog} run recipes/smollm2_codebook.py                      the CPU demo (SmolLM2-135M, codebook, LoRA)
  {prog} run recipes/smollm2_aqlm.py --help                   every config key of a recipe, with defaults
  {prog} compress --config configs/smollm2_codebook.yaml      compress only; writes outputs/<run_name>/
  {prog} recover --config configs/smollm2_codebook.yaml recovery.max_steps=100
  {prog} evaluate outputs/smollm2_codebook                    perplexity of the saved model
  {prog} report --config configs/smollm2_report.yaml
  {prog} chat outputs/smollm2_codebook                        talk to the saved model (/reset, /exit)
"""


class CommandError(Exception):
    """A usage or config error: printed as ``error: ...`` without a traceback."""


# -- help text ------------------------------------------------------------------------------------


def _show(value) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" or value.strip() != value else value
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def format_keys(keys: list[FieldHelp], raw: dict, source: str | None) -> str:
    """The config-key section of ``--help``: ``key  type = value  {allowed}`` then the meaning."""
    lines = [
        "config keys (set them in the YAML or as key.sub=value; "
        + (f"values shown are {source}'s, else the defaults):" if source else "values shown are the defaults):")
    ]
    for h in keys:
        found, value = _lookup(raw, h.key)
        shown = f"= {_show(value)}" if found else f"= {_show(h.default)}"
        if found and value != h.default:
            shown += f"  (default {_show(h.default)})"
        allowed = f"  {{{', '.join(_show(a) for a in h.allowed)}}}" if h.allowed else ""
        lines.append(f"  {h.key}  {h.type} {shown}{allowed}")
        if h.doc:
            lines.extend(textwrap.wrap(h.doc, 96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def config_help(cls: type, raw: dict, source: str | None) -> str:
    from lit_cb.configs.schema import config_keys

    return format_keys(config_keys(cls, raw), raw, source)


# -- recipes --------------------------------------------------------------------------------------


def load_recipe(path: str | Path) -> ModuleType:
    """A recipe file: ``main(cfg)``, ``DEFAULT_CONFIG`` and optionally ``CONFIG_CLASS`` (default
    :class:`RunConfig`). Recipes import their heavy modules inside ``main``, so loading one is cheap."""
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


def _config_parser(
    prog: str, description: str, default_config: str | Path | None, example: str = "recovery.max_steps=50"
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=description, add_help=False, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help, with every config key, and exit")
    parser.add_argument(
        "--config",
        default=None,
        metavar="X.yaml",
        help=f"YAML config (default: {default_config})" if default_config else "YAML config (default: none)",
    )
    parser.add_argument("--verbose", action="store_true", help="show every warning and tracebacks")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help=f"overrides, e.g. {example}")
    return parser


def _parse_config(
    parser: argparse.ArgumentParser,
    argv: list[str],
    cls: type,
    default_config: str | Path | None,
    forced: dict | None = None,
) -> tuple[object | None, argparse.Namespace]:
    """Parse ``[--config X] [overrides]``; on ``--help`` print the help with every key and return
    ``(None, args)``, else the validated config. ``forced`` (``{"section.key": value}``) is what the
    command itself sets, after validation; an override that asks for another value is an error."""
    args = parser.parse_args(argv)
    path = args.config or default_config
    if args.help:
        try:
            raw = read_config_dict(path, args.overrides)
        except (ValueError, FileNotFoundError) as err:
            raise CommandError(str(err)) from err
        print(parser.format_help())
        print(config_help(cls, raw, str(path) if path else None))
        return None, args
    try:
        cfg = build(cls, read_config_dict(path, args.overrides))
    except (ValueError, FileNotFoundError) as err:
        raise CommandError(str(err)) from err
    for key, value in (forced or {}).items():
        given = read_config_dict(None, [o for o in args.overrides if o.split("=", 1)[0] == key])
        found, asked = _lookup(given, key)
        if found and asked != value:
            raise CommandError(
                f"{parser.prog} sets {key}={_show(value)}; the override {key}={_show(asked)} contradicts it"
            )
        *sections, leaf = key.split(".")
        node = cfg
        for section in sections:
            node = getattr(node, section)
        setattr(node, leaf, value)
    return cfg, args


def _quiet(verbose: bool) -> None:
    from lit_cb import quiet

    quiet.configure(verbose)


def run_recipe(recipe_path: str | Path, argv: list[str], prog: str | None = None) -> dict | None:
    """Parse ``[--config X] [overrides]`` for a recipe file and run it (``None`` after ``--help``)."""
    recipe = load_recipe(recipe_path)
    cls = getattr(recipe, "CONFIG_CLASS", RunConfig)
    summary = (recipe.__doc__ or "").strip().split("\n\n")[0]
    parser = _config_parser(prog or f"lightning run {recipe_path}", summary, recipe.DEFAULT_CONFIG)
    cfg, args = _parse_config(parser, argv, cls, recipe.DEFAULT_CONFIG)
    if cfg is None:
        return None
    _quiet(args.verbose)
    return recipe.main(cfg)


# -- commands -------------------------------------------------------------------------------------


def _cmd_run(prog: str, argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(
            f"usage: {prog} run <recipe.py> [--config X.yaml] [--verbose] [key.sub=value ...]\n\n"
            f"{COMMANDS['run']}.\n`{prog} run <recipe.py> --help` lists every config key of that recipe.\n"
            "Recipes: recipes/*.py of the lit_cb repository."
        )
        return 0 if argv else 2
    run_recipe(argv[0], argv[1:], prog=f"{prog} run {argv[0]}")
    return 0


def _run_pipeline(cfg: RunConfig) -> dict:
    from lit_cb.pipeline import run

    return run(cfg)


def _cmd_compress(prog: str, argv: list[str]) -> int:
    parser = _config_parser(
        f"{prog} compress",
        COMMANDS["compress"] + ". Writes <output_dir>/<run_name>/: blocks/, model/, metrics.json; "
        f"`{prog} recover` with the same config then fine-tunes it.",
        None,
    )
    cfg, args = _parse_config(parser, argv, RunConfig, None, forced={"recovery.max_steps": 0})
    if cfg is None:
        return 0
    _quiet(args.verbose)
    _run_pipeline(cfg)
    return 0


def _cmd_recover(prog: str, argv: list[str]) -> int:
    parser = _config_parser(
        f"{prog} recover",
        COMMANDS["recover"] + ". Use the config the run was compressed with: the finished blocks in "
        "<run>/blocks are reused (a different compression config is refused), last.ckpt resumes training.",
        None,
    )
    cfg, args = _parse_config(parser, argv, RunConfig, None, forced={"resume": True})
    if cfg is None:
        return 0
    blocks = cfg.run_dir / "blocks"
    has_progress = any(blocks.glob("block_*.safetensors")) or (cfg.run_dir / "checkpoints" / "last.ckpt").is_file()
    if not has_progress and not cfg.compression.blocks_from:
        raise CommandError(
            f"{cfg.run_dir} holds no compressed blocks and no checkpoint: run `{prog} compress` with this config "
            "first, or start from another run's blocks with compression.blocks_from=<its folder>"
        )
    if cfg.recovery.max_steps == 0:
        raise CommandError("recovery.max_steps=0: nothing to recover; set recovery.max_steps to the steps wanted")
    _quiet(args.verbose)
    _run_pipeline(cfg)
    return 0


def _cmd_evaluate(prog: str, argv: list[str]) -> int:
    parser = _config_parser(f"{prog} evaluate", COMMANDS["evaluate"] + ".", None, example="max_eval_windows=0")
    parser.usage = f"{prog} evaluate <model folder or smollm2> [--config X.yaml] [--verbose] [key=value ...]"
    positional, rest = [], []
    for i, a in enumerate(argv):
        after_option = i > 0 and argv[i - 1] == "--config"
        (rest if a.startswith("-") or "=" in a or after_option else positional).append(a)
    if len(positional) > 1:
        raise CommandError(f"evaluate takes one model folder, got {positional}")
    rest += [f"model_dir={positional[0]}"] if positional else []
    cfg, args = _parse_config(parser, rest, EvaluateConfig, None)
    if cfg is None:
        return 0
    _quiet(args.verbose)
    from lit_cb.evaluate import evaluate_saved

    result = evaluate_saved(cfg)
    p = result["protocol"]
    print(
        f"perplexity of {result['model_dir']} on {p['eval_source']} "
        f"({p['num_windows']} windows of {p['eval_seqlen']} tokens): {result['perplexity']:.3f} "
        f"in {result['seconds']:.1f} s"
    )
    if result["stored_ppl"]:
        stored = ", ".join(f"{k} {v:.3f}" for k, v in result["stored_ppl"].items())
        print(f"stored by the saving run: {stored}")
    return 0


def _cmd_report(prog: str, argv: list[str]) -> int:
    parser = _config_parser(
        f"{prog} report", COMMANDS["report"] + ". Writes report.json, report.md and pareto.png.", None, "methods=[fp16]"
    )
    cfg, args = _parse_config(parser, argv, ReportConfig, None)
    if cfg is None:
        return 0
    _quiet(args.verbose)
    from lit_cb.report import run_report

    run_report(cfg)
    return 0


def delegate(command: str, argv: list[str]) -> int:
    """Hand ``argv`` to ``main(argv) -> int`` of the module behind ``command`` (imported only now)."""
    module_name = DELEGATED[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name != module_name:
            raise
        raise CommandError(f"`{command}` needs {module_name}, which this lit_cb installation does not have") from err
    main_fn = getattr(module, "main", None)
    if not callable(main_fn):
        raise CommandError(f"{module_name} defines no main(argv)")
    return int(main_fn(list(argv)) or 0)


HANDLERS: dict[str, Callable[[str, list[str]], int]] = {
    "run": _cmd_run,
    "compress": _cmd_compress,
    "recover": _cmd_recover,
    "evaluate": _cmd_evaluate,
    "report": _cmd_report,
}


def usage(prog: str) -> str:
    width = max(len(c) for c in COMMANDS)
    commands = "\n".join(f"  {c:<{width}}  {h}" for c, h in COMMANDS.items())
    return (
        f"usage: {prog} <command> [--config X.yaml] [--verbose] [key.sub=value ...]\n\n"
        "Compress LLMs to 2-3 bits/weight with learned codebooks (LLM-Codebook, AQLM), recover them\n"
        "by fine-tuning, and evaluate them, as Lightning recipes.\n\n"
        f"commands:\n{commands}\n\n"
        f"`{prog} <command> --help` lists the options and every config key of a command.\n\n"
        + EXAMPLES.format(prog=prog)
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or Path(sys.argv[0]).name or "lit_cb"
    if prog not in ("lightning", "lit-cb", "lit_cb"):
        prog = "lit_cb"
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(prog))
        return 0
    command, rest = argv[0], argv[1:]
    verbose = "--verbose" in rest
    try:
        if command in DELEGATED:
            return delegate(command, rest)
        if command not in HANDLERS:
            raise CommandError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)} (see {prog} --help)")
        return HANDLERS[command](prog, rest)
    except CommandError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, AttributeError, RuntimeError) as err:
        if verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
