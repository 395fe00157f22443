"""bench/cpu_weighting.py: every variant is a valid config at the demo's bits, and --collect reads finished
runs as they are (real run folders are made by the CLI; here a metrics.json of the shape it writes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lit_cb.config import load_config, save_config

from .conftest import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_every_variant_is_a_valid_config_differing_from_uniform_only_where_named():
    script = load_script("bench/cpu_weighting.py")
    base = load_config(ROOT / script.CONFIG).compression
    for name, overrides in script.VARIANTS.items():
        comp = load_config(ROOT / script.CONFIG, overrides).compression
        if name.startswith("trellis"):  # another format at about the same bits (2.06): its own defaults
            assert comp.method == "trellis" and comp.method_config == {}, name
            if name == "trellis_fisher":  # k = 1/2/3 per layer at uniform k = 2's exact bits, Fisher-allocated
                assert comp.bit_budget == 2.0625 and comp.sensitivity_weighting == "fisher", name
                assert [o.bits_per_step for o in comp.bit_option_settings()] == [1, 2, 3], name
            continue
        assert comp.method_config == base.method_config, name  # same codebook shape: the same 2.056 bits
        mixed = any(o.startswith("compression.bit_budget") for o in overrides)
        assert (comp.bit_budget == 2.056) == mixed, name
        assert comp.row_weighting == ("fisher" if "rows" in name or "both" in name else "none"), name
        assert comp.sensitivity_weighting == ("fisher" if "fisher" in name and "rows" not in name else "relative"), name
        recipe = load_config(ROOT / script.CONFIG, [*script.PROTOCOLS["recipe"], *overrides])
        assert recipe.compression.method_config == base.method_config, name  # the protocol keeps the bits
        epochs = 8 if name.endswith("_ft8") else 2  # the variant named for it overrides the protocol's 2 epochs
        assert recipe.compression.finetune_settings().epochs == epochs and recipe.recovery.distill_alpha == 1.0, name
        assert recipe.recovery.train_codebooks and not load_config(ROOT / script.CONFIG).recovery.train_codebooks


def test_collect_reads_finished_runs_and_summarises_seeds(tmp_path):
    script = load_script("bench/cpu_weighting.py")
    for seed, (comp, rec) in {0: (140.0, 90.0), 1: (150.0, 96.0)}.items():
        run = tmp_path / f"uniform_s{seed}"
        run.mkdir()
        save_config(load_config(ROOT / script.CONFIG, [f"seed={seed}"]), run / "run_config.yaml")
        metrics = {
            "wikitext2_ppl": {"float": 24.1, "compressed": comp, "recovered": rec},
            "bits_per_weight": {"compressed_linears": 2.056},
            "stages": {"compress": {"seconds": 230.0}},
            "environment": {"device": "CPU", "versions": {"torch": "x"}},
        }
        (run / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "r.json"
    cmd = [sys.executable, "bench/cpu_weighting.py", "--runs-dir", str(tmp_path), "--collect", "--out", str(out)]
    res = subprocess.run([*cmd, "--seeds", "0,1"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "uniform           compressed   145.00  recovered    93.00  (mean of 2 seeds)" in res.stdout
    record = json.loads(out.read_text())
    uniform = record["variants"]["uniform"]
    assert uniform["recovered"]["values"] == [90.0, 96.0]
    assert uniform["recovered"]["sd"] == pytest.approx(18**0.5)  # sample sd of 90 and 96
    assert record["variants"]["mixed_fisher"]["recovered"]["n"] == 0  # not run: no figure, not a zero
    assert record["per_seed"]["uniform"]["1"]["finished"] is True
    assert record["device"] == "CPU" and record["seeds"] == [0, 1]
    assert "seed=1 data.seed=1" in " ".join(record["commands"]["uniform"])
    bad = subprocess.run([*cmd, "--variants", "nope"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "['nope'] unknown" in bad.stderr
    # the demo's runs are not the recipe protocol's: refused by name, not summarised as if they were
    other = subprocess.run([*cmd, "--seeds", "0", "--protocol", "recipe"], cwd=ROOT, capture_output=True, text=True)
    assert other.returncode != 0 and "not made by --protocol recipe variant uniform" in other.stderr
    assert "block_finetune" in other.stderr
