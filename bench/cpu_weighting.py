"""Issue 14 on the CPU: which sensitivity weighting makes mixed bits beat uniform bits, and does weighting each
layer's output rows by the float model's Fisher help the codebook itself?

Every variant is the CPU demo config (``configs/smollm2_codebook.yaml``: 16 x 512-token calibration windows,
4 WikiText-2 windows of 2048 tokens, 30 LoRA steps) at the same 2.056 bits/weight over the compressed
linears, compressed with ``lit_cb compress`` and then recovered with ``lit_cb recover``, so each pair of
rows differs in one setting only:

    uniform        g4 B8 everywhere (the demo)
    mixed_relative B 7/8/9 per layer, allocated by relative Hessian-weighted error (the H100's lora2_mixed)
    mixed_fisher   B 7/8/9 per layer, allocated by the Fisher-weighted error (estimated loss increase)
    rows_fisher    g4 B8 everywhere, each codebook fitted to the Fisher-weighted rows (compression.row_weighting)
    both_fisher    mixed_fisher + rows_fisher
    mixed_fisher_wide  B 6/7/8/9/10 per layer, allocated by the Fisher-weighted error
    trellis        the computed-codes trellis (L12 k2) instead of the codebook
    trellis_fisher the trellis with k = 1/2/3 bits per step per layer, Fisher-allocated at uniform k = 2's bits
    uniform_ft8    uniform with 8 epochs of block fine-tuning (with --protocol recipe: 2)

    python bench/cpu_weighting.py --runs-dir /tmp/cpu_weighting --seeds 0,1 --out bench/results/cpu_weighting.json
    python bench/cpu_weighting.py --protocol recipe --variants uniform,mixed_fisher --runs-dir DIR2 ...

``--protocol recipe`` adds what the H100 recipes (``smollm2_codebook_lora2*``) have and the demo lacks, at
the demo's scale: 2 epochs of block fine-tuning after each block is clustered, pure KL distillation from the
float model, and trained codebooks and scales during recovery. Why: block fine-tuning and distillation can
absorb the error an allocation moves around, so a gain measured without them might not reach the GPU recipe.
About 10 minutes a variant on 2 cores.
    python bench/cpu_weighting.py --runs-dir DIR --collect --out ...   # only read finished runs

Runs that already finished in ``--runs-dir`` are not run again (the CLI resumes or refuses), so an
interrupted sweep continues where it stopped. About 7 minutes a variant on 2 cores. The demo protocol's
figures are not comparable with the H100 full protocol's; the comparison between rows is the point.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/smollm2_codebook.yaml"
MIXED = [
    "compression.bit_budget=2.056",
    "compression.bit_options=[{nbits: 7}, {nbits: 8}, {nbits: 9}]",
]
VARIANTS: dict[str, list[str]] = {
    "uniform": [],
    "mixed_relative": [*MIXED, "compression.sensitivity_weighting=relative"],
    "mixed_fisher": [*MIXED, "compression.sensitivity_weighting=fisher"],
    "rows_fisher": ["compression.row_weighting=fisher"],
    "both_fisher": [*MIXED, "compression.sensitivity_weighting=fisher", "compression.row_weighting=fisher"],
    "trellis": ["compression.method=trellis", "compression.method_config={}"],  # computed codes (issue 10), L12 k2
    # the trellis with k = 1, 2 or 3 bits per step per layer, Fisher-allocated at uniform k = 2's exact bits
    "trellis_fisher": [
        "compression.method=trellis",
        "compression.method_config={}",
        "compression.bit_budget=2.0625",
        "compression.bit_options=[{bits_per_step: 1}, {bits_per_step: 2}, {bits_per_step: 3}]",
        "compression.sensitivity_weighting=fisher",
        "compression.sensitivity_max_rows=128",  # a quarter of the default 512: three L12 Viterbi searches a layer
    ],
    # block fine-tuning 4x longer than the recipe protocol's 2 epochs (on the H100 every block's best epoch was the
    # last of 5, for the codebook and the trellis alike: trellis_compressed_h100_runs/, quality_smollm2_h100_runs/)
    "uniform_ft8": ["compression.block_finetune={epochs: 8, lr: 1.0e-4, batch_size: 4}"],
    "mixed_fisher_wide": [
        "compression.bit_budget=2.056",
        "compression.bit_options=[{nbits: 6}, {nbits: 7}, {nbits: 8}, {nbits: 9}, {nbits: 10}]",
        "compression.sensitivity_weighting=fisher",
    ],
}

PROTOCOLS: dict[str, list[str]] = {
    "demo": [],
    "recipe": [
        "compression.block_finetune={epochs: 2, lr: 1.0e-4, batch_size: 4}",
        "recovery.distill_alpha=1.0",
        "recovery.train_codebooks=true",
        "recovery.codebook_lr=3.0e-5",
    ],
}


def _run_name(name: str, seed: int) -> str:
    return f"{name}_s{seed}"


def _command(stage: str, name: str, seed: int, runs_dir: Path, protocol: str = "demo") -> list[str]:
    return [
        sys.executable,
        "-m",
        "lit_cb.cli",
        stage,
        "--config",
        CONFIG,
        f"run_name={_run_name(name, seed)}",
        f"output_dir={runs_dir}",
        f"seed={seed}",
        f"data.seed={seed}",
        *PROTOCOLS[protocol],
        *VARIANTS[name],
    ]


def _made_as_asked(runs_dir: Path, name: str, seed: int, protocol: str) -> None:
    """Refuse a finished run whose saved config is not this protocol's and variant's (a run of the other
    protocol in the same folder would otherwise be collected, or skipped, as if it were this one)."""
    import yaml

    from lit_cb.config import load_config

    saved = runs_dir / _run_name(name, seed) / "run_config.yaml"
    if not saved.is_file():
        raise SystemExit(f"{saved} is missing: cannot tell which protocol made {saved.parent}")
    made = yaml.safe_load(saved.read_text())
    asked = load_config(ROOT / CONFIG, [*PROTOCOLS[protocol], *VARIANTS[name]]).to_dict()
    for section in ("compression", "recovery"):
        if made.get(section) != asked[section]:
            diff = sorted(k for k in asked[section] if made.get(section, {}).get(k) != asked[section][k])
            raise SystemExit(
                f"{saved.parent} was not made by --protocol {protocol} variant {name}: {section} differs in {diff}"
            )


def _metrics(runs_dir: Path, name: str, seed: int) -> dict | None:
    path = runs_dir / _run_name(name, seed) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _row(runs_dir: Path, name: str, seed: int, protocol: str) -> dict:
    m = _metrics(runs_dir, name, seed)
    if m is None:
        return {"finished": False, "overrides": VARIANTS[name]}
    _made_as_asked(runs_dir, name, seed, protocol)
    ppl = m["wikitext2_ppl"]
    alloc = (m.get("compression_report") or {}).get("bit_allocation") or {}
    per_option: dict[str, int] = {}
    for j in (alloc.get("choice") or {}).values():
        per_option[f"option_{j}"] = per_option.get(f"option_{j}", 0) + 1
    return {
        "finished": "recovered" in ppl,
        "overrides": VARIANTS[name],
        "wikitext2_ppl": ppl,
        "bits_per_weight": m["bits_per_weight"],
        "bits_per_weight_recovered": m.get("bits_per_weight_recovered"),
        "layers_per_option": per_option or None,
        "compress_seconds": (m.get("stages") or {}).get("compress", {}).get("seconds"),
        "environment": m.get("environment"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds (seed and data.seed: calibration, data order)")
    ap.add_argument("--collect", action="store_true", help="only read the finished runs in --runs-dir")
    ap.add_argument(
        "--protocol", choices=list(PROTOCOLS), default="demo", help="demo, or recipe (+ block FT, KL, codebooks)"
    )
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        ap.error(f"--variants {unknown} unknown; allowed: {list(VARIANTS)}")
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x]
    except ValueError:
        ap.error(f"--seeds {args.seeds!r} must be comma-separated integers")
    if not args.collect:
        for seed in seeds:
            for name in names:
                m = _metrics(args.runs_dir, name, seed)
                if m is not None and "recovered" in m["wikitext2_ppl"]:
                    _made_as_asked(args.runs_dir, name, seed, args.protocol)
                    continue
                for stage in ("compress", "recover"):
                    subprocess.run(_command(stage, name, seed, args.runs_dir, args.protocol), cwd=ROOT, check=True)
    per_seed = {name: {str(seed): _row(args.runs_dir, name, seed, args.protocol) for seed in seeds} for name in names}
    rows = {name: _summary(runs) for name, runs in per_seed.items()}
    envs = [r["environment"] for runs in per_seed.values() for r in runs.values() if r.get("environment")]
    record = {
        "what": f"CPU {args.protocol} protocol at 2.056 bits: uniform vs mixed bits (relative / Fisher allocation) "
        "vs Fisher row weighting of each codebook; compressed and recovered WikiText-2 (4 windows)",
        "command": "python bench/cpu_weighting.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": CONFIG,
        "protocol": {"name": args.protocol, "overrides": PROTOCOLS[args.protocol]},
        "device": envs[0]["device"] if envs else None,
        "versions": envs[0]["versions"] if envs else None,
        "seeds": seeds,
        "commands": {
            n: [
                " ".join(_command(s, n, seed, args.runs_dir, args.protocol)[2:])
                for seed in seeds
                for s in ("compress", "recover")
            ]
            for n in names
        },
        "variants": rows,
        "per_seed": per_seed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for name, r in rows.items():
        comp, rec = r["compressed"]["mean"], r["recovered"]["mean"]
        print(f"{name:17s} compressed {comp:8.2f}  recovered {rec:8.2f}  (mean of {r['recovered']['n']} seeds)")


def _summary(runs: dict[str, dict]) -> dict:
    """Mean, sample sd and values over the seeds that finished, per stage."""
    out: dict = {"overrides": next(iter(runs.values()))["overrides"]}
    for stage in ("compressed", "recovered"):
        vals = [r["wikitext2_ppl"][stage] for r in runs.values() if r["finished"]]
        mean = sum(vals) / len(vals) if vals else float("nan")
        sd = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5 if len(vals) > 1 else None
        out[stage] = {"mean": mean, "sd": sd, "values": vals, "n": len(vals)}
    return out


if __name__ == "__main__":
    main()
