"""End to end on a tiny random Llama: real Trainer, real peft, real safetensors files."""

from __future__ import annotations

import csv
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

from lit_cb.cli import load_recipe, main
from lit_cb.config import RunConfig, build, load_config
from lit_cb.pipeline import run
from lit_cb.serialization import load_compressed

from .conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    model = tiny_llama(num_layers=2, vocab=len(tiny_tokenizer))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _overrides(model_dir: Path, out: Path, **extra) -> list[str]:
    base = {
        "run_name": "tiny",
        "output_dir": str(out),
        "model.name": str(model_dir),
        "data.num_calibration_samples": 8,
        "data.calibration_seqlen": 32,
        "data.num_finetune_samples": 64,
        "data.finetune_seqlen": 32,
        "data.num_val_samples": 2,
        "data.eval_seqlen": 64,
        "data.max_eval_windows": 3,
        "data.batch_size": 4,
        "compression.method": "codebook",
        "compression.method_config": "{in_group_size: 4, nbits: 4, kmeans_iters: 3}",
        "compression.forward_batch_size": 4,
        "recovery.max_steps": 24,
        "recovery.lr": 0.01,
        "recovery.warmup_steps": 2,
        "recovery.lora_r": 4,
        "recovery.lora_on_compressed": True,
        "trainer.accelerator": "cpu",
        "trainer.log_every_n_steps": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _train_losses(run_dir: Path) -> list[float]:
    (metrics_csv,) = run_dir.glob("logs/version_*/metrics.csv")
    with open(metrics_csv) as f:
        return [float(r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")]


def test_cli_runs_calibration_and_lora_and_lowers_the_loss(tiny_model_dir, tmp_path):
    recipe = ROOT / "recipes" / "smollm2_codebook.py"
    rc = main(["run", str(recipe), *_overrides(tiny_model_dir, tmp_path / "out")])
    assert rc == 0
    run_dir = tmp_path / "out" / "tiny"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ppl = metrics["wikitext2_ppl"]
    assert set(ppl) == {"float", "compressed", "recovered"}
    losses = _train_losses(run_dir)
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4
    assert ppl["recovered"] < ppl["compressed"]
    bpw = metrics["bits_per_weight"]
    assert 1.0 < bpw["compressed_linears"] < bpw["whole_model"]
    assert (run_dir / "blocks" / "block_001.safetensors").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # Where the figures were made: this process's device, versions and command line.
    env = metrics["environment"]
    assert env["device"].startswith("CPU") and env["versions"]["torch"] == torch.__version__
    assert env["command"] == shlex.join([sys.executable, *sys.argv]) and env["date"].endswith("+00:00")


def test_saved_compressed_model_reproduces_its_perplexity(tiny_model_dir, tmp_path):
    from lit_cb.data import CompressionDataModule
    from lit_cb.evaluate import perplexity

    cfg = load_config(None, _overrides(tiny_model_dir, tmp_path / "out", **{"recovery.max_steps": 0}))
    metrics = run(cfg)
    assert torch.are_deterministic_algorithms_enabled()  # trainer.deterministic defaults to true
    model, tokenizer, meta = load_compressed(cfg.run_dir / "model")
    dm = CompressionDataModule(tokenizer, cfg.data)
    reproduced = perplexity(model, dm.test_windows(), progress=False)
    assert reproduced == pytest.approx(metrics["wikitext2_ppl"]["compressed"], rel=1e-5)
    assert meta["wikitext2_ppl"]["compressed"] == metrics["wikitext2_ppl"]["compressed"]


def test_resumed_run_rebuilds_from_its_checkpoint_without_recalibrating(tiny_model_dir, tmp_path, monkeypatch):
    import lit_cb.callbacks

    first = run(load_config(None, _overrides(tiny_model_dir, tmp_path / "out", **{"recovery.max_steps": 12})))
    assert first["stages"]["recover"]["steps"] == 12 and first["stages"]["recover"]["resumed_from"] is None

    def no_calibration(*args, **kwargs):
        raise AssertionError("a run resumed from last.ckpt must not compress again")

    monkeypatch.setattr(lit_cb.callbacks, "compress_model", no_calibration)
    cfg = load_config(None, _overrides(tiny_model_dir, tmp_path / "out", **{"recovery.max_steps": 24}))
    second = run(cfg)
    recover = second["stages"]["recover"]
    assert recover["steps"] == 24 and recover["resumed_from"].endswith("last.ckpt")
    assert recover["seconds"] > 0
    # The compression metrics travel in the checkpoint; training went on from step 12, not from 0.
    assert second["wikitext2_ppl"]["compressed"] == first["wikitext2_ppl"]["compressed"]
    assert second["bits_per_weight"] == first["bits_per_weight"]
    resumed_log = cfg.run_dir / "logs" / "version_1" / "metrics.csv"
    with open(resumed_log) as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train_loss")]
    assert min(steps) >= 12 and len(steps) == 12


def test_every_recipe_and_config_load_and_match():
    """litgpt-style: each recipe loads with its default config; every YAML in configs/ belongs to a
    recipe (``<recipe>.yaml`` or ``<recipe>_<variant>.yaml``) and validates against its schema."""
    from lit_cb.config import RunConfig

    recipes = {p.stem: load_recipe(p) for p in sorted((ROOT / "recipes").glob("*.py"))}
    assert len(recipes) >= 3
    for stem, recipe in recipes.items():
        assert Path(recipe.DEFAULT_CONFIG) == ROOT / "configs" / f"{stem}.yaml", stem
        cfg = load_config(recipe.DEFAULT_CONFIG, cls=getattr(recipe, "CONFIG_CLASS", RunConfig))
        assert cfg.run_name == stem, f"{stem}: run_name {cfg.run_name}"
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        owners = [s for s in recipes if path.stem == s or path.stem.startswith(s + "_")]
        assert owners, f"{path.name} belongs to no recipe"
        owner = max(owners, key=len)
        load_config(path, cls=getattr(recipes[owner], "CONFIG_CLASS", RunConfig))


def test_gpu_recipe_without_gpu_fails_clearly(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = main(["run", str(ROOT / "recipes" / "llama7b_codebook.py"), f"output_dir={tmp_path}"])
    assert rc == 1
    assert "needs a GPU" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,match",
    [
        ("recovery.max_stepz=3", r"unknown config key.*recovery.max_stepz"),
        ("data.calibration_sampling=random", "calibration_sampling"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("model.dtype=int8", "model.dtype"),
        ("compression.method=squeeze", "unknown compression method"),
        ("recovery.distill_alpha=2", "distill_alpha"),
        ("nonsense", "key.sub=value"),
    ],
)
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_cli_reports_bad_config_without_traceback(capsys):
    rc = main(["run", str(ROOT / "recipes" / "smollm2_codebook.py"), "recovery.lr=-1"])
    assert rc == 1
    assert "recovery.lr=-1" in capsys.readouterr().err


def test_config_roundtrip():
    cfg = load_config(ROOT / "configs" / "smollm2_codebook.yaml")
    assert build(RunConfig, cfg.to_dict()) == cfg
