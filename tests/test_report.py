"""The comparison report on a tiny random Llama: real bitsandbytes, real GPTQ/RTN, real files."""

from __future__ import annotations

import json
from pathlib import Path

import bitsandbytes  # noqa: E402, F401  (the NF4/FP4 rows need it; missing is a failure, not a skip)
import pytest

from lit_cb.cli import load_recipe
from lit_cb.config import load_config
from lit_cb.data.datamodule import CompressionDataModule, DataConfig
from lit_cb.evaluate import perplexity
from lit_cb.models import load_model
from lit_cb.report import METHODS, ReportConfig, pareto_front, run_report

from .conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
HIDDEN, INTERMEDIATE = 64, 128
GROUP = 32


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    model = tiny_llama(num_layers=2, hidden=HIDDEN, intermediate=INTERMEDIATE, vocab=len(tiny_tokenizer))
    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def _config(model_dir: Path, out: Path, methods: list[str], **extra) -> ReportConfig:
    overrides = {
        "run_name": "tiny_report",
        "output_dir": str(out),
        "methods": json.dumps(methods),
        "model.name": str(model_dir),
        "data.num_calibration_samples": 8,
        "data.calibration_seqlen": 32,
        "data.eval_seqlen": 64,
        "data.max_eval_windows": 3,
        "rtn.group_size": GROUP,
        "gptq.group_size": GROUP,
        "bnb.blocksize": 64,
        "trainer.accelerator": "cpu",
        "progress": False,
        **extra,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()], cls=ReportConfig)


def test_report_rows_files_and_reference_values(tiny_model_dir, tmp_path):
    cfg = _config(tiny_model_dir, tmp_path / "out", ["fp16", "rtn_4bit", "gptq_4bit", "bnb_nf4"])
    result = run_report(cfg, command="pytest")
    out = tmp_path / "out" / "tiny_report"
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(result["rows"]))
    for key in ("model", "protocol", "device", "versions", "date", "command"):
        assert key in on_disk
    rows = {r["method"]: r for r in on_disk["rows"]}
    assert list(rows) == ["fp16", "rtn_4bit", "gptq_4bit", "bnb_nf4"]

    # Bits by hand: 4-bit codes plus one fp16 scale and one fp16 zero per group of GROUP columns.
    assert rows["rtn_4bit"]["bits_per_weight"] == pytest.approx(4 + 32 / GROUP)
    assert rows["gptq_4bit"]["bits_per_weight"] == pytest.approx(4 + 32 / GROUP)
    # NF4: 4-bit codes plus one float32 absmax per 64 weights.
    assert rows["bnb_nf4"]["bits_per_weight"] == pytest.approx(4 + 32 / 64)
    assert rows["fp16"]["bits_per_weight"] == 16.0
    assert rows["rtn_4bit"]["bits_per_weight_whole_model"] > rows["rtn_4bit"]["bits_per_weight"]
    # On disk (measured from the saved tensors, codes packed at 4 bits): the same; bitsandbytes rows are not
    # saved by lit_cb, a float16 checkpoint is 16 bits.
    assert rows["rtn_4bit"]["bits_per_weight_on_disk"] == pytest.approx(4 + 32 / GROUP)
    assert rows["gptq_4bit"]["bits_per_weight_on_disk"] == pytest.approx(4 + 32 / GROUP)
    assert rows["bnb_nf4"]["bits_per_weight_on_disk"] is None and rows["fp16"]["bits_per_weight_on_disk"] == 16.0

    # fp16 row (eval dtype float32 on CPU) == perplexity() of an independently loaded model on
    # independently built windows.
    model, tok = load_model(str(tiny_model_dir))
    dm = CompressionDataModule(tok, DataConfig(eval_seqlen=64, max_eval_windows=3))
    expected = perplexity(model, dm.test_windows(), 1, "cpu", progress=False)
    assert rows["fp16"]["wikitext2_ppl"] == pytest.approx(expected, rel=1e-6)
    assert on_disk["protocol"]["eval_windows"] == 3
    # Quantization changed something, and not absurdly.
    for name in ("rtn_4bit", "gptq_4bit", "bnb_nf4"):
        assert rows[name]["wikitext2_ppl"] != pytest.approx(expected, rel=1e-7)
        assert rows[name]["wikitext2_ppl"] < 3 * expected

    md = (out / "report.md").read_text()
    for name in rows:
        assert f"| {name} |" in md
    assert "over the quantized linears" in md
    assert "bits/weight, nominal (quantized linears) | bits/weight on disk (quantized linears)" in md
    assert f"| rtn_4bit | {4 + 32 / GROUP:.3f} | {4 + 32 / GROUP:.3f} |" in md
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_gptq_beats_rtn_at_3_bits(tiny_model_dir, tmp_path):
    cfg = _config(tiny_model_dir, tmp_path / "out", ["rtn_3bit", "gptq_3bit"])
    rows = {r["method"]: r for r in run_report(cfg, command="pytest")["rows"]}
    rtn, gptq = rows["rtn_3bit"], rows["gptq_3bit"]
    assert rtn["bits_per_weight"] == pytest.approx(gptq["bits_per_weight"])
    # 3-bit codes packed at 3 bits on disk (they used to take a byte each): nominal == measured.
    assert rtn["bits_per_weight_on_disk"] == pytest.approx(3 + 32 / GROUP) == gptq["bits_per_weight_on_disk"]
    # GPTQ minimises exactly the Hessian-weighted layer error that the driver measures.
    assert gptq["mean_relative_layer_error"] < 0.9 * rtn["mean_relative_layer_error"]


def test_qlora_row_trains_lora_and_counts_adapters(tiny_model_dir, tmp_path):
    cfg = _config(
        tiny_model_dir,
        tmp_path / "out",
        ["bnb_nf4", "qlora_nf4"],
        **{
            "data.num_finetune_samples": 64,
            "data.finetune_seqlen": 32,
            "data.batch_size": 4,
            "recovery.max_steps": 24,
            "recovery.lr": 0.01,
            "recovery.warmup_steps": 2,
            "recovery.lora_r": 4,
            "bnb.compute_dtype": "float32",
        },
    )
    rows = {r["method"]: r for r in run_report(cfg, command="pytest")["rows"]}
    nf4, qlora = rows["bnb_nf4"], rows["qlora_nf4"]
    assert qlora["steps"] == 24
    # LoRA r=4 on each target linear, 16 bits per adapter parameter, over the quantized weights.
    shapes = [(HIDDEN, HIDDEN), (32, HIDDEN), (32, HIDDEN), (HIDDEN, HIDDEN)] + [(INTERMEDIATE, HIDDEN)] * 2
    shapes += [(HIDDEN, INTERMEDIATE)]
    n = 2 * sum(o * i for o, i in shapes)
    lora = 2 * sum(4 * (o + i) for o, i in shapes)
    assert qlora["bits_per_weight"] == pytest.approx(4.5 + 16 * lora / n)
    assert qlora["wikitext2_ppl"] < nf4["wikitext2_ppl"]


def test_bad_method_names_list_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown report method.*gptq_5bit.*allowed.*'fp16'"):
        ReportConfig(methods=["fp16", "gptq_5bit"])
    with pytest.raises(ValueError, match="allowed"):
        load_config(None, ["methods=[rtn_1bit]"], cls=ReportConfig)
    with pytest.raises(ValueError, match="group_size"):
        ReportConfig(rtn={"group_size": 0})
    with pytest.raises(ValueError, match="unknown config key"):
        load_config(None, ["nonsense.key=1"], cls=ReportConfig)
    assert "qlora_nf4" in METHODS


def test_pareto_front_keeps_only_undominated_rows():
    rows = [
        {"method": "a", "bits_per_weight": 16.0, "wikitext2_ppl": 20.0},
        {"method": "b", "bits_per_weight": 4.5, "wikitext2_ppl": 25.0},
        {"method": "c", "bits_per_weight": 4.5, "wikitext2_ppl": 30.0},
        {"method": "d", "bits_per_weight": 3.1, "wikitext2_ppl": 200.0},
        {"method": "e", "bits_per_weight": 8.0, "wikitext2_ppl": 26.0},
    ]
    assert [r["method"] for r in pareto_front(rows)] == ["d", "b", "a"]


def test_report_recipes_load_with_their_configs():
    for stem in ("smollm2_report", "smollm2_bnb4", "llama7b_bnb4"):
        recipe = load_recipe(ROOT / "recipes" / f"{stem}.py")
        cfg = load_config(recipe.DEFAULT_CONFIG, cls=recipe.CONFIG_CLASS)
        assert cfg.run_name == stem
    full = load_config(ROOT / "configs" / "smollm2_report_full.yaml", cls=ReportConfig)
    assert set(full.methods) == set(METHODS)
    assert full.eval.dtype == "float16" and full.data.max_eval_windows is None


def _finished_run(folder: Path, blocks_from: str | None, eval_seqlen: int = 2048) -> Path:
    """A run folder as lit_cb writes it (metrics.json + run_config.yaml), with hand-set figures."""
    import yaml

    folder.mkdir(parents=True)
    metrics = {
        "run_name": folder.name,
        "method": "codebook",
        "wikitext2_ppl": {"float": 21.6, "compressed": 72.5, "recovered": 44.9},
        "bits_per_weight": {"compressed_linears": 2.056, "whole_model": 4.99},
        "bits_per_weight_recovered": {"compressed_linears": 2.148, "whole_model": 5.07},
        "bits_per_weight_on_disk": {"compressed_linears": 2.148},
        "stages": {"compress": {"seconds": 21.0}, "recover": {"seconds": 490.0}},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    config = {
        "model": {"name": "smollm2"},
        "data": {"eval_source": "wikitext2", "eval_seqlen": eval_seqlen, "max_eval_windows": None},
        "compression": {"blocks_from": blocks_from},
    }
    (folder / "run_config.yaml").write_text(yaml.safe_dump(config))
    return folder


def test_collected_rows_say_when_a_run_reused_compressed_blocks(tmp_path):
    """A run started from another run's blocks (compression.blocks_from) spent seconds reading them, not
    compressing: its rows say so, so the report's seconds column is not read as a compression time."""
    from lit_cb.report.collected import CollectedRows

    class Rows(CollectedRows):
        config = ReportConfig()

    reused = _finished_run(tmp_path / "l2e_s0", "/runs/base_s0")
    own = _finished_run(tmp_path / "own", None, eval_seqlen=1024)
    compressed, recovered = Rows().collect_rows(f"lora2={reused}")
    assert (compressed["method"], compressed["wikitext2_ppl"], compressed["seconds"]) == ("lora2", 72.5, 21.0)
    assert (recovered["method"], recovered["wikitext2_ppl"], recovered["seconds"]) == ("lora2_recovered", 44.9, 511.0)
    # the adapters were merged into the compressed linears: the saved files measure the recovered model only
    assert compressed["bits_per_weight_on_disk"] is None and recovered["bits_per_weight_on_disk"] == 2.148
    for row in (compressed, recovered):
        assert "compressed blocks reused from /runs/base_s0: seconds exclude compression" in row["notes"]
        assert "PROTOCOL DIFFERS" not in row["notes"]
    rows = Rows().collect_rows(str(own))
    assert all("reused" not in (row.get("notes") or "") for row in rows)
    assert all("PROTOCOL DIFFERS: data.eval_seqlen=1024" in row["notes"] for row in rows)
