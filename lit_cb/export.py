"""``lit_cb export <model dir> --format {aqlm,lit_cb} --out DIR``: convert between model folders.

* a lit_cb model folder ``--format aqlm``: the folder stock transformers loads
  with the ``aqlm`` package (see :mod:`lit_cb.interop.aqlm`), with the low-rank slots of merged LoRA
  adapters as a peft adapter in ``lora/``; refused, naming the layer, when AQLM cannot express the
  model (RTN/GPTQ layers, mixed formats, ...);
* an AQLM folder (``quantization_config.quant_method == "aqlm"``) ``--format lit_cb``: a lit_cb
  folder with the same tensors in CodebookLinear layers (recoverable, servable by lit_cb's kernels),
  an adapter in its ``lora/`` merged into their low-rank slots.

``--out`` must not exist or be an empty folder; it appears only once complete.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("aqlm", "lit_cb")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lit_cb export",
        description="Convert a model folder: lit_cb -> AQLM (--format aqlm), AQLM -> lit_cb (--format lit_cb).",
    )
    parser.add_argument("model_dir", help="a lit_cb model folder (outputs/<run>/model) or an AQLM folder")
    parser.add_argument("--format", required=True, choices=FORMATS, help="format to write")
    parser.add_argument("--out", required=True, help="output folder: must not exist or be empty")
    return parser


def export(model_dir: str | Path, fmt: str, out_dir: str | Path) -> Path:
    """Convert ``model_dir`` to ``fmt`` in ``out_dir``; everything is checked before any work.

    The input kind is told by AQLM's marker (``quantization_config.quant_method == "aqlm"``); any
    other folder is handed to :func:`lit_cb.serialization.load_compressed`, which names what a
    lit_cb folder lacks, so this stays right whatever that folder's layout becomes."""
    from lit_cb.interop.aqlm import export_aqlm, import_to_lit_cb, is_aqlm_dir
    from lit_cb.interop.outdir import check_new_output_dir

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r} is not allowed; use one of {list(FORMATS)}")
    src = Path(model_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"model dir {src} is not an existing folder")
    check_new_output_dir(out_dir)
    aqlm_input = is_aqlm_dir(src)
    if fmt == "aqlm":
        if aqlm_input:
            raise ValueError(f"{src} is already an AQLM folder (--format aqlm); nothing to convert")
        return export_aqlm(src, out_dir)
    if not aqlm_input:
        raise ValueError(
            f"{src} is not an AQLM folder (config.json with quantization_config.quant_method 'aqlm'); "
            "--format lit_cb converts AQLM folders into lit_cb folders"
        )
    return import_to_lit_cb(src, out_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = export(args.model_dir, args.format, args.out)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.format} folder {out}")
    from lit_cb.interop.aqlm import ADAPTER_DIR

    adapter = Path(out) / ADAPTER_DIR
    if args.format == "aqlm" and adapter.is_dir():
        print(
            f"the low-rank slots are the peft LoRA adapter {adapter}: put it on the loaded model with "
            f"PeftModel.from_pretrained(model, '{adapter}') or model.load_adapter('{adapter}')"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
