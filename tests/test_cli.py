"""The command line: help that lists every config key without importing torch, errors that name
the key, one command per stage, and the outputs and summary of a real (tiny) run."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import subprocess
import sys
import types
import typing
import warnings
from pathlib import Path

import pytest

from lit_cb import cli, quiet
from lit_cb.config import load_config
from lit_cb.configs import methods
from lit_cb.configs.block_finetune import BlockFinetuneConfig
from lit_cb.configs.compression import HESSIAN_DTYPE_NAMES, CompressionConfig
from lit_cb.configs.evaluate import EvaluateConfig
from lit_cb.configs.report import ReportConfig
from lit_cb.configs.run import DTYPE_NAMES, EMBEDDED_MODEL_NAMES, RunConfig
from lit_cb.configs.schema import DICT_FIELDS, DriverFields
from lit_cb.typed_config import field_docs

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.py"))
HEAVY = ("torch", "lightning", "pytorch_lightning", "transformers", "peft", "torchmetrics", "bitsandbytes")


def _recipe_class(recipe: Path) -> type:
    text = recipe.read_text()
    return ReportConfig if "CONFIG_CLASS = ReportConfig" in text else RunConfig


def _config_owner(path: Path) -> Path:
    owners = [r for r in RECIPES if path.stem == r.stem or path.stem.startswith(r.stem + "_")]
    assert owners, f"{path.name} belongs to no recipe"
    return max(owners, key=lambda r: len(r.stem))


def _all_config_classes() -> list[type]:
    """Every config dataclass reachable from the commands' config classes (nested sections, the
    classes behind dict fields, every registered method)."""
    seen: list[type] = []
    todo = [RunConfig, ReportConfig, EvaluateConfig, BlockFinetuneConfig]
    # lit_cb's own methods (tests elsewhere register probe methods of their own)
    todo += [c for c in map(methods.config_class, methods.method_names()) if c.__module__.startswith("lit_cb.")]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for tp in typing.get_type_hints(cls).values():
            if dataclasses.is_dataclass(tp):
                todo.append(tp)
    return seen


def expected_keys(cls: type, raw: dict, prefix: str = "") -> list[str]:
    """Every key ``--help`` must list, found by walking the dataclasses (independently of the help code)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            keys += expected_keys(tp, raw.get(f.name, {}), key + ".")
            continue
        keys.append(key)
        target = DICT_FIELDS.get((cls, f.name))
        if target == "method":
            method = raw.get("method", CompressionConfig.method)
            keys += expected_keys(methods.config_class(method), {}, key + ".")
        elif isinstance(target, DriverFields):
            keys += [f"{key}.{n}" for n in target.names]
        elif target is not None:
            keys += expected_keys(target, {}, key + ".")
    return keys


def _python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (the installed lit_cb); it prints one JSON line last."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def helps() -> dict:
    """``--help`` of every recipe and command, all in one fresh process that must not import torch."""
    code = f"""
import contextlib, io, json, sys
from pathlib import Path
from lit_cb.cli import main
out = {{}}
for target in {[str(r) for r in RECIPES]!r} + ["", "compress", "recover", "evaluate", "report"]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        argv = ["run", target, "--help"] if target.endswith(".py") else ([target, "--help"] if target else ["--help"])
        rc = main(argv, prog="lit_cb")
    out[target] = {{"rc": rc, "text": buf.getvalue()}}
out["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print(json.dumps(out))
"""
    return _python(code)


# -- help -----------------------------------------------------------------------------------------


def test_help_imports_no_torch_or_lightning(helps):
    assert helps["modules"] == []


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_help_lists_every_config_key(helps, recipe):
    import yaml

    result = helps[str(recipe)]
    assert result["rc"] == 0
    text = result["text"]
    raw = yaml.safe_load((ROOT / "configs" / f"{recipe.stem}.yaml").read_text())
    keys = expected_keys(_recipe_class(recipe), raw)
    assert len(keys) > 40
    for key in keys:
        match = re.search(rf"^  {re.escape(key)}  (\S.*)\n      (\S.*)$", text, re.M)
        assert match, f"{recipe.stem} --help does not list {key} with its one-line meaning"
        assert " = " in match.group(1), f"{key}: no value shown"


def test_help_shows_type_default_value_and_allowed_values(helps):
    text = helps[str(ROOT / "recipes" / "smollm2_codebook.py")]["text"]
    assert re.search(r"^  recovery\.max_steps  int = 30  \(default 200\)$", text, re.M)
    assert "  trainer.precision  str = 32-true  {32-true, 16-mixed, bf16-mixed, bf16-true, 16-true}" in text
    methods = r"\{aqlm, bnb4, codebook, gptq, rtn, trellis\}"
    assert re.search(r"^  compression\.method  str = codebook  " + methods + "$", text, re.M)
    assert "  compression.method_config.weighting  str = gptvq  {hessian_diag, gptvq, none}" in text
    aqlm = helps[str(ROOT / "recipes" / "smollm2_aqlm.py")]["text"]
    assert "compression.method_config.beam_size" in aqlm and "compression.method_config.weighting" not in aqlm


@pytest.mark.parametrize("command", ["compress", "recover", "evaluate", "report"])
def test_every_command_has_its_own_help(helps, command):
    result = helps[command]
    assert result["rc"] == 0
    assert result["text"].startswith(f"usage: lit_cb {command}")
    cls = {"evaluate": EvaluateConfig, "report": ReportConfig}.get(command, RunConfig)
    for key in expected_keys(cls, {}):
        assert re.search(rf"^  {re.escape(key)}  ", result["text"], re.M), f"{command} --help lacks {key}"


def test_top_level_help_is_written_for_users(helps):
    text = helps[""]["text"]
    for command in ("run", "compress", "recover", "evaluate", "report", "export", "generate", "chat"):
        assert re.search(rf"^  {command} +\S", text, re.M), command
    assert "``" not in text and ":class:" not in text and ":func:" not in text


def test_every_config_field_has_a_one_line_meaning():
    missing = [
        f"{cls.__name__}.{f.name}"
        for cls in _all_config_classes()
        for f in dataclasses.fields(cls)
        if not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]) and not field_docs(cls).get(f.name)
    ]
    assert missing == []


def test_every_dict_field_says_whose_fields_it_holds():
    for cls in _all_config_classes():
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
            if any(a is dict or typing.get_origin(a) is dict for a in args):
                assert (cls, f.name) in DICT_FIELDS, f"{cls.__name__}.{f.name}: add it to DICT_FIELDS"


def test_torch_free_names_match_the_torch_tables():
    from lit_cb.hessian import HESSIAN_DTYPES
    from lit_cb.models import DTYPES, EMBEDDED_MODELS
    from lit_cb.quant import registry

    assert set(DTYPE_NAMES) == set(DTYPES)
    assert set(HESSIAN_DTYPE_NAMES) == set(HESSIAN_DTYPES)
    assert set(EMBEDDED_MODEL_NAMES) == set(EMBEDDED_MODELS)
    assert set(registry._BUILTIN_MODULES) == set(methods.method_names()) - {"recording_rtn_test_probe"}


# -- validation -----------------------------------------------------------------------------------


def test_validating_every_config_and_bad_values_imports_no_torch():
    pairs = [(str(p), _recipe_class(_config_owner(p)).__name__) for p in sorted((ROOT / "configs").glob("*.yaml"))]
    code = f"""
import json, sys
from lit_cb.cli import main
from lit_cb.config import load_config
from lit_cb.configs.report import ReportConfig
from lit_cb.configs.run import RunConfig
names = []
for path, cls in {pairs!r}:
    names.append(load_config(path, cls={{"ReportConfig": ReportConfig, "RunConfig": RunConfig}}[cls]).run_name)
rcs = [main(["compress", "recovery.lr=fast"]), main(["run", "recipes/smollm2_codebook.py", "trainer.loggers=[x]"]),
       main(["recover", "--config", "configs/smollm2_aqlm.yaml", "output_dir=/nonexistent"]),
       # the value a command sets itself neither hides a bad override nor silently replaces a good one
       main(["compress", "recovery.max_steps=abc"]), main(["compress", "recovery.max_steps=5"]),
       main(["recover", "resume=false"])]
print(json.dumps({{"names": names, "rcs": rcs,
                  "modules": sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})}}))
"""
    out = _python(code)
    assert out["modules"] == []
    assert len(out["names"]) == len(pairs) >= 10
    assert out["rcs"] == [1] * 6


@pytest.mark.parametrize(
    "override,expected",
    [
        ("recovery.max_steps=abc", "recovery.max_steps='abc' must be an int"),
        ("recovery.max_steps=-1", "recovery.max_steps=-1 must be >= 0"),
        ("recovery.lr=fast", "recovery.lr='fast' must be a float"),
        (
            "recovery.max_stepz=3",
            "unknown config key(s) ['recovery.max_stepz']; allowed in recovery: "
            "['code_update_backtracks', 'code_update_every'",
        ),
        ("trainer.precision=fp8", "trainer.precision='fp8' must be one of the allowed values ['32-true'"),
        ("trainer.loggers=[csv, wandb]", "trainer.loggers=['csv', 'wandb'] must be a list of the allowed values"),
        ("eval.float_model=maybe", "eval.float_model='maybe' must be true or false"),
        ("data.max_eval_windows=x", "data.max_eval_windows='x' must be null or an int"),
        ("data.max_eval_windows=0", "data.max_eval_windows=0 must be >= 1 or null"),
        ("data.teacher_seed=-1", "data.teacher_seed=-1 must be an integer >= 0 or null"),
        ("data.teacher_cache_dir=''", "data.teacher_cache_dir='' must be a non-empty folder path or null"),
        ("compression.method=squeeze", "unknown compression method 'squeeze'; known methods: ['aqlm'"),
        ("compression.method_config.weighting=foo", "compression.method_config.weighting='foo' must be one of"),
        ("compression.method_config.nbits=1", "compression.method_config: CodebookConfig.nbits=1 is invalid"),
        ("compression.block_finetune.lr=-1", "compression.block_finetune: BlockFinetuneConfig.lr=-1 is not allowed"),
        ("model=smollm2", "config key model must be a mapping"),
    ],
)
def test_bad_values_name_the_key_the_value_and_what_is_allowed(override, expected):
    with pytest.raises(ValueError) as err:
        load_config(ROOT / "configs" / "smollm2_codebook.yaml", [override])
    assert expected in str(err.value)


def test_yaml_float_strings_are_floats():
    # YAML 1.1 reads 1e-4 (no dot) as a string; a float field takes it as the number it means.
    cfg = load_config(None, ["recovery.lr=1e-4", "compression.method_config.damp=2e-2"])
    assert cfg.recovery.lr == 1e-4 and cfg.compression.method_settings().damp == 0.02


def _leaves(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp
            if (cls, f.name) == (CompressionConfig, "method_config"):
                for name in methods.method_names():
                    if name in ("codebook", "aqlm", "gptq", "rtn"):
                        for key, sub in _leaves(methods.config_class(name), f"{prefix}{f.name}."):
                            yield f"{key}@{name}", sub
            if (cls, f.name) == (CompressionConfig, "block_finetune"):
                yield from _leaves(BlockFinetuneConfig, f"{prefix}{f.name}.")


def _wrong_type(tp) -> object:
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    if all(a is str for a in args):
        return 12345
    if any(a in (bool, int, float) or typing.get_origin(a) is typing.Literal for a in args):
        return [] if any(a is str for a in args) else "not-a-value"
    return 12345


@pytest.mark.parametrize(("key", "tp"), list(_leaves(RunConfig)), ids=lambda v: v if isinstance(v, str) else "")
def test_each_field_rejects_a_wrong_type_and_an_out_of_range_value_by_name(key, tp):
    key, _, method = key.partition("@")
    leaf = key.rsplit(".", 1)[-1]
    base = [f"compression.method={method}"] if method else []
    with pytest.raises(ValueError) as err:
        load_config(None, [*base, f"{key}={json.dumps(_wrong_type(tp))}"])
    assert key in str(err.value) or (leaf in str(err.value) and key.rsplit(".", 1)[0] in str(err.value))
    for extreme in (-(10**9), 10**9, -1e9, 1e9):
        try:
            load_config(None, [*base, f"{key}={extreme}"])
        except ValueError as rejected:
            assert leaf in str(rejected), f"{key}={extreme}: {rejected}"


# -- commands -------------------------------------------------------------------------------------


def test_export_generate_and_chat_dispatch_to_their_modules(monkeypatch, capsys):
    calls = []
    for name in ("export", "generate", "chat"):
        stand_in = types.ModuleType(f"lit_cb.{name}")
        stand_in.main = lambda argv, name=name: calls.append((name, argv)) or 7
        monkeypatch.setitem(sys.modules, f"lit_cb.{name}", stand_in)
    assert cli.main(["export", "outputs/run/model", "--format", "gguf"]) == 7
    assert cli.main(["generate", "--help"]) == 7
    assert cli.main(["chat", "smollm2", "--system", "hi"]) == 7
    assert calls == [
        ("export", ["outputs/run/model", "--format", "gguf"]),
        ("generate", ["--help"]),
        ("chat", ["smollm2", "--system", "hi"]),
    ]


def test_missing_delegated_module_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lit_cb.generate", None)  # import now fails as if the file were absent
    assert cli.main(["generate", "hello"]) == 1
    assert "`generate` needs lit_cb.generate" in capsys.readouterr().err


def test_unknown_command_lists_the_commands(capsys):
    assert cli.main(["squash"]) == 1
    err = capsys.readouterr().err
    assert "unknown command 'squash'" in err and "compress" in err and "generate" in err


def test_recover_without_a_compressed_run_says_what_to_do(tmp_path, capsys):
    assert cli.main(["recover", f"output_dir={tmp_path}", "run_name=none"]) == 1
    assert "holds no compressed blocks" in capsys.readouterr().err


# -- quiet output ---------------------------------------------------------------------------------


def test_quiet_drops_the_advertisement_and_named_warnings_only(caplog):
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.configure()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning, stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("💡 Tip: ... try installing [litlogger](https://pypi.org/project/litlogger/) to enable ...")
            logger.info("GPU available: False, used: False")
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    assert "litlogger" not in caplog.text and "GPU available" in caplog.text


# -- a real run through the stage commands ----------------------------------------------------------


def test_compress_recover_evaluate_on_a_tiny_model(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    from lit_cb.quant import registry

    from .conftest import tiny_llama

    model_dir = tmp_path / "tiny"
    tiny_llama(num_layers=2, vocab=len(tiny_tokenizer)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    common = [
        f"output_dir={tmp_path / 'out'}",
        "run_name=tiny",
        f"model.name={model_dir}",
        "data.num_calibration_samples=4",
        "data.calibration_seqlen=32",
        "data.num_finetune_samples=16",
        "data.finetune_seqlen=32",
        "data.num_val_samples=2",
        "data.eval_seqlen=64",
        "data.max_eval_windows=2",
        "data.batch_size=4",
        "compression.method_config.in_group_size=4",
        "compression.method_config.nbits=4",
        "compression.method_config.kmeans_iters=2",
        "compression.method_config.codebook_update_steps=0",
        "recovery.lr=0.01",
        "recovery.lora_r=4",
        "recovery.lora_on_compressed=true",
        "trainer.accelerator=cpu",
        "trainer.log_every_n_steps=1",
        "trainer.val_check_interval=3",
    ]
    run_dir = tmp_path / "out" / "tiny"
    assert cli.main(["compress", *common, "eval.float_model=false"]) == 0
    compressed = json.loads((run_dir / "metrics.json").read_text())
    assert set(compressed["wikitext2_ppl"]) == {"compressed"} and compressed["stages"]["recover"]["steps"] == 0
    assert "eval_compressed" in compressed["stages"]
    capsys.readouterr()

    def no_quantization(*args, **kwargs):
        raise AssertionError("recover must reuse the compressed blocks")

    monkeypatch.setattr(registry, "quantize_linear", no_quantization)
    assert cli.main(["recover", *common, "recovery.max_steps=6"]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ppl = metrics["wikitext2_ppl"]
    assert ppl["compressed"] == pytest.approx(compressed["wikitext2_ppl"]["compressed"], rel=1e-6)
    assert metrics["stages"]["recover"]["steps"] == 6
    # Every stage, the compressed-model evaluation included, with its time; every output's path.
    for name in ("load", "eval_float", "compress", "eval_compressed", "recover", "eval_recovered", "save"):
        assert name in metrics["stages"] and re.search(rf"^  {name} +\d+\.\d", out, re.M), name
    for what in ("model", "metrics", "csv logs", "tensorboard", "recovery plot", "checkpoint"):
        assert re.search(rf"^    {what}: +{re.escape(str(run_dir))}", out, re.M), what
    # The progress bar counts steps out of max_steps, and there is one checkpoint, last.ckpt.
    assert re.search(r"recovery: 100%.*\b6/6 ", out + err) and "Epoch 0/" not in out + err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert list((run_dir / "tensorboard").glob("version_0/events.out.tfevents.*"))
    assert (run_dir / "recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert cli.main(["evaluate", str(run_dir), f"output={tmp_path / 'eval.json'}"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["perplexity"] == pytest.approx(ppl["recovered"], rel=1e-5)
    expected = {"eval_source": "wikitext2", "eval_seqlen": 64, "max_eval_windows": 2, "num_windows": 2}
    assert result["protocol"] == expected
