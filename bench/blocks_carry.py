"""Carry a run's compressed blocks from one GPU session to the next, so that recovery variants start from them
(``compression.blocks_from``) without compressing again.

A lent GPU machine keeps nothing between sessions, and what comes back from it is at most 8 files of 16 MiB per
call; what goes to it, 64 MiB per call. A SmolLM2 trellis run's blocks hold 108 MB of codes, one uint8 per 2-bit
symbol (the layout the kernels read). Packed at their width (:mod:`lit_cb.bitpack`) they take 27 MB, so three
seeds' blocks come back in two calls and go out again in two or three.

    python bench/blocks_carry.py pack RUN_DIR OUT_DIR [--name NAME] [--part-mib 15]
    python bench/blocks_carry.py unpack PARTS_DIR/NAME.manifest.json DEST_RUN_DIR

``pack`` writes ``NAME.manifest.json`` and ``NAME.partNN`` (each at most ``--part-mib``) into ``OUT_DIR``: the run's
``blocks/progress.json``, ``fingerprint.json`` and ``run_config.yaml`` and every ``blocks/block_*.safetensors``
tensor, where uint8 tensors whose values fit 1, 2 or 4 bits are packed at that width (the manifest records each
tensor's width and the sha256 of its original bytes). ``unpack`` joins the parts (checking their sha256), unpacks,
checks every tensor against its recorded sha256 and writes ``DEST_RUN_DIR/blocks`` (through a temporary folder
renamed at the end) with the run's files beside it: a folder ``compression.blocks_from`` takes, which checks the
compression fingerprint before use. An existing ``DEST_RUN_DIR`` is refused (nothing is overwritten).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import sys

import torch
from safetensors.torch import load, load_file, save, save_file

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lit_cb.bitpack import pack_bits, unpack_bits  # noqa: E402

RUN_FILES = ("fingerprint.json", "run_config.yaml")
WIDTHS = (1, 2, 4)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def pack(run_dir: pathlib.Path, out_dir: pathlib.Path, name: str, part_mib: float) -> pathlib.Path:
    blocks = run_dir / "blocks"
    if not (blocks / "progress.json").is_file():
        raise SystemExit(f"{run_dir}: no blocks/progress.json (not a run that compressed, or not finished)")
    manifest_path = out_dir / f"{name}.manifest.json"
    if manifest_path.exists():
        raise SystemExit(f"{manifest_path} exists; choose another --name or folder (nothing is overwritten)")
    bundle: dict[str, torch.Tensor] = {}
    tensors: dict[str, dict] = {}
    raw = 0
    for path in sorted(blocks.glob("block_*.safetensors")):
        for key, t in load_file(str(path)).items():
            raw += t.numel() * t.element_size()
            entry = {"file": path.name, "key": key, "dtype": str(t.dtype), "shape": list(t.shape), "sha256": _sha(t)}
            width = None
            if t.dtype == torch.uint8 and t.numel():
                top = int(t.max())
                width = next((w for w in WIDTHS if top < 2**w), None)
            stored = pack_bits(t.flatten(), width) if width else t.contiguous()
            entry["bits"] = width
            tensors[f"{path.name}::{key}"] = entry
            bundle[f"{path.name}::{key}"] = stored
    files = {f: (run_dir / f).read_text() for f in RUN_FILES if (run_dir / f).is_file()}
    files["blocks/progress.json"] = (blocks / "progress.json").read_text()
    data = save(bundle)
    out_dir.mkdir(parents=True, exist_ok=True)
    size = int(part_mib * 2**20)
    parts = []
    for i in range(0, len(data), size):
        part = out_dir / f"{name}.part{i // size:02d}"
        part.write_bytes(data[i : i + size])
        parts.append({"name": part.name, "sha256": hashlib.sha256(data[i : i + size]).hexdigest()})
    manifest = {
        "what": "compressed blocks packed by bench/blocks_carry.py",
        "run_dir": str(run_dir),
        "bundle_sha256": hashlib.sha256(data).hexdigest(),
        "bundle_bytes": len(data),
        "parts": parts,
        "tensors": tensors,
        "files": files,
    }
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    mib = f"{raw / 2**20:.1f} MiB -> {len(data) / 2**20:.1f} MiB"
    print(f"{run_dir}: {len(tensors)} tensors, {mib} in {len(parts)} parts")
    return manifest_path


def unpack(manifest_path: pathlib.Path, dest: pathlib.Path) -> None:
    if dest.exists():
        raise SystemExit(f"{dest} exists; name a new run folder (nothing is overwritten)")
    manifest = json.loads(manifest_path.read_text())
    data = b""
    for part in manifest["parts"]:
        path = manifest_path.parent / part["name"]
        if not path.is_file():
            raise SystemExit(f"{path}: missing part of {manifest_path.name}")
        chunk = path.read_bytes()
        if hashlib.sha256(chunk).hexdigest() != part["sha256"]:
            raise SystemExit(f"{path}: sha256 differs from the manifest's (a damaged or foreign part)")
        data += chunk
    if hashlib.sha256(data).hexdigest() != manifest["bundle_sha256"]:
        raise SystemExit(f"{manifest_path}: the joined parts are not the bundle that was packed")
    bundle = load(data)
    by_file: dict[str, dict[str, torch.Tensor]] = {}
    for full, entry in manifest["tensors"].items():
        stored = bundle[full]
        shape = torch.Size(entry["shape"])
        dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
        t = unpack_bits(stored, entry["bits"], shape.numel()).to(dtype).reshape(shape) if entry["bits"] else stored
        if _sha(t) != entry["sha256"]:
            raise SystemExit(f"{full}: unpacked tensor differs from the packed run's")
        by_file.setdefault(entry["file"], {})[entry["key"]] = t
    tmp = dest.with_name(dest.name + ".unpacking")
    if tmp.exists():
        shutil.rmtree(tmp)  # an unpack a crash interrupted: never a run's own folder
    (tmp / "blocks").mkdir(parents=True)
    for file, tensors in by_file.items():
        save_file(tensors, str(tmp / "blocks" / file))
    for rel, text in manifest["files"].items():
        (tmp / rel).write_text(text)
    tmp.rename(dest)
    print(f"{dest}: {len(by_file)} blocks from {manifest['run_dir']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack")
    pk.add_argument("run_dir", type=pathlib.Path)
    pk.add_argument("out_dir", type=pathlib.Path)
    pk.add_argument("--name", default=None, help="default: the run folder's name")
    pk.add_argument("--part-mib", type=float, default=15.0, help="largest part (what comes back: 16 MiB a file)")
    up = sub.add_parser("unpack")
    up.add_argument("manifest", type=pathlib.Path)
    up.add_argument("dest", type=pathlib.Path)
    args = p.parse_args()
    if args.cmd == "pack":
        if not 0 < args.part_mib <= 16:
            p.error(f"--part-mib {args.part_mib}: allowed 0 < MiB <= 16 (the largest file that comes back)")
        pack(args.run_dir, args.out_dir, args.name or args.run_dir.name, args.part_mib)
    else:
        unpack(args.manifest, args.dest)


if __name__ == "__main__":
    main()
