"""Bit-packed codes on disk (lit_cb.bitpack, format version 2): the stream layout against a pure-Python
bit string, files that hold B bits per code, bit-identical loads (old unpacked folders too), and the
measured on-disk bits/weight against the bytes in the safetensors file."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import lit_cb  # noqa: F401  registers quant_method lit_cb
from lit_cb.bitpack import needs_packing, pack_bits, packed_nbytes, unpack_bits
from lit_cb.compress import bits_per_weight
from lit_cb.configs.dense import RTNConfig
from lit_cb.hf_quantizer import attach
from lit_cb.integrity import MANIFEST
from lit_cb.interop.aqlm import export_aqlm
from lit_cb.layers import CodebookFormat, CodebookLinear, unpack_codes
from lit_cb.quant.dense_quant import GroupQuantLinear
from lit_cb.quant.rtn import quantize_rtn
from lit_cb.serialization import bits_per_weight_on_disk, load_compressed, measure_bits_on_disk, save_compressed

from .conftest import tiny_llama

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj")
LINEARS += ("mlp.up_proj", "mlp.down_proj")


def reference_pack(values: list[int], nbits: int) -> bytes:
    """The documented layout written out: code i is stream bits [i*B, (i+1)*B), LSB first; stream bit k is
    bit k % 8 of byte k // 8; the tail is zero-padded to a byte."""
    stream = "".join(format(v, f"0{nbits}b")[::-1] for v in values)  # LSB first
    stream += "0" * (-len(stream) % 8)
    return bytes(int(stream[i : i + 8][::-1], 2) for i in range(0, len(stream), 8))


@pytest.mark.parametrize("nbits", range(1, 17))
def test_pack_matches_the_reference_bit_string_and_round_trips(nbits):
    rng = random.Random(nbits)
    top = 2**nbits - 1
    for length in (0, 1, 7, 8, 9, 13, 64 + nbits, 1001):
        values = [rng.randrange(top + 1) for _ in range(length)]
        if length >= 3:
            values[0], values[1], values[-1] = 0, top, top  # the edges, also in the padded tail
        t = torch.tensor(values, dtype=torch.int64)
        packed = pack_bits(t, nbits)
        assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(length, nbits) == math.ceil(
            length * nbits / 8
        )
        assert bytes(packed.tolist()) == reference_pack(values, nbits), (nbits, length)
        assert torch.equal(unpack_bits(packed, nbits, length), t)
    # The in-memory dtypes: uint8 for B <= 8, int16 above, where codes >= 2**15 are stored wrapped (B = 16).
    stored = torch.tensor([0, top, top // 2 + 1, 1], dtype=torch.int64)
    mem = stored.to(torch.uint8) if nbits <= 8 else torch.where(stored >= 2**15, stored - 2**16, stored).to(torch.int16)
    assert bytes(pack_bits(mem.reshape(2, 2), nbits).tolist()) == reference_pack(stored.tolist(), nbits)
    assert needs_packing(nbits) == (nbits not in (8, 16))


def test_pack_spans_chunks():
    """More codes than one processing chunk: chunk boundaries must not shift the stream."""
    t = torch.randint(0, 2**5, ((1 << 20) + 37,), generator=torch.Generator().manual_seed(0))
    packed = pack_bits(t, 5)
    start = (1 << 20) - 64  # byte-aligned (a multiple of 8 codes), 64 codes before the chunk boundary
    assert bytes(packed[start * 5 // 8 :].tolist()) == reference_pack(t[start:].tolist(), 5)
    assert torch.equal(unpack_bits(packed, 5, t.numel()), t)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"nbits=0 must be an integer in \[1, 16\]"):
        pack_bits(torch.zeros(3, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match=r"nbits=17"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 17, 1)
    with pytest.raises(ValueError, match=r"codes lie in \[0, 8\], outside \[0, 8\) for nbits=3"):
        pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(ValueError, match="outside"):
        pack_bits(torch.tensor([-1]), 3)
    with pytest.raises(TypeError, match="integer codes"):
        pack_bits(torch.zeros(2), 3)
    with pytest.raises(ValueError, match="a stream of 10 3-bit codes takes 4 bytes, this one holds 3"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, 10)


def codebook_model(nbits: int, num_codebooks: int = 1, group: int = 8, seed: int = 0) -> torch.nn.Module:
    """A tiny Llama whose block linears are CodebookLinear layers with random codes of ``nbits`` bits."""
    model = tiny_llama(num_layers=2, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for block in model.model.layers:
        for name in LINEARS:
            old = block.get_submodule(name)
            fmt = CodebookFormat(
                old.in_features, old.out_features, group, 1, num_codebooks, nbits_per_codebook=nbits, bias=False
            )
            codes = torch.randint(0, 2**nbits, (fmt.num_out_groups, fmt.num_in_groups, num_codebooks), generator=gen)
            codes[0, 0, 0], codes[-1, -1, -1] = 0, 2**nbits - 1
            codebooks = torch.randn(num_codebooks, 2**nbits, 1, group, generator=gen) * 0.1
            scales = torch.rand(fmt.num_out_groups, generator=gen) + 0.5
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, CodebookLinear.from_tensors(fmt, codes, codebooks, scales))
    return model


def _ids() -> torch.Tensor:
    return torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name, t in sa.items():
        assert sb[name].dtype == t.dtype and sb[name].shape == t.shape and torch.equal(sb[name], t), name


@pytest.mark.parametrize("nbits", [3, 10])
def test_saved_codes_take_b_bits_and_load_back_bit_identical(nbits, tmp_path, tiny_tokenizer):
    model = codebook_model(nbits)
    folder = save_compressed(model, tmp_path / "model", tiny_tokenizer)
    spec = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert spec["format_version"] == 2
    name = "model.layers.1.mlp.down_proj"
    assert spec["modules"][name]["codes_packed"] is True
    layer = model.get_submodule(name)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        on_disk = f.get_tensor(f"{name}.codes")
    unpacked_bytes = layer.codes.numel() * layer.codes.element_size()  # uint8 for B=3, int16 for B=10
    assert on_disk.dtype == torch.uint8 and on_disk.numel() == math.ceil(layer.codes.numel() * nbits / 8)
    assert on_disk.numel() / unpacked_bytes == pytest.approx(nbits / (8 * layer.codes.element_size()), abs=1e-3)
    loaded, _, meta = load_compressed(folder)
    _assert_same_state(model, loaded)
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).logits, loaded(input_ids=_ids()).logits)


def test_unpacked_version_1_folders_still_load(tmp_path, tiny_tokenizer):
    """A folder as lit_cb wrote it before packing (format_version 1, one code per uint8) loads identically."""
    model = codebook_model(5)
    folder = save_compressed(model, tmp_path / "model", tiny_tokenizer)
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    tensors = load_file(str(folder / "model.safetensors"))
    for name, spec in qc["modules"].items():
        assert spec.pop("codes_packed") is True
        tensors[f"{name}.codes"] = model.get_submodule(name).codes.clone()
    qc["format_version"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / MANIFEST).unlink()
    with pytest.warns(UserWarning, match="has no manifest.json"):
        loaded, _, _ = load_compressed(folder)
    _assert_same_state(model, loaded)
    # A packed flag in a version-1 config is refused before any model is built.
    qc["modules"][name]["codes_packed"] = True
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="packed codes exist from format version 2"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_b7_codes_saved_exported_and_loaded_with_from_pretrained(tmp_path, tiny_tokenizer):
    model = codebook_model(7, num_codebooks=2)
    with torch.no_grad():
        expected = model(input_ids=_ids()).logits
    folder = save_compressed(model, tmp_path / "model", tiny_tokenizer)
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, expected)
    # What `model.save_pretrained` writes after attach (the transformers-loadable export) packs the same way.
    attach(model)
    model.save_pretrained(tmp_path / "again")
    with (
        safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as a,
        safe_open(str(folder / "model.safetensors"), "pt") as b,
    ):
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():  # noqa: SIM118
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(again(input_ids=_ids()).logits, expected)
    # The AQLM export keeps AQLM's own layout: one int8 element per code, [out groups, in groups, M].
    aqlm = export_aqlm(folder, tmp_path / "aqlm")
    name = "model.layers.0.self_attn.q_proj"
    with safe_open(str(aqlm / "model.safetensors"), "pt") as f:
        codes = f.get_tensor(f"{name}.codes")
    layer = loaded.get_submodule(name)
    assert codes.dtype == torch.int8 and codes.shape == layer.codes.shape
    assert torch.equal(codes.to(torch.int64) & 0x7F, unpack_codes(layer.codes, 7))


def rtn_model(bits: int, group: int = 32) -> torch.nn.Module:
    model = tiny_llama(num_layers=2)
    for block in model.model.layers:
        for name in LINEARS:
            old = block.get_submodule(name)
            new = quantize_rtn(old.weight.detach(), None, RTNConfig(bits=bits, group_size=group))
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, new)
    return model


def test_rtn_3bit_codes_are_packed(tmp_path):
    model = rtn_model(3)
    folder = save_compressed(model, tmp_path / "model")
    name = "model.layers.0.mlp.up_proj"
    layer = model.get_submodule(name)
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f"{name}.codes").numel() == math.ceil(128 * 64 * 3 / 8)  # 3 bits, not a byte, per code
    loaded, _, _ = load_compressed(folder)
    assert isinstance(loaded.get_submodule(name), GroupQuantLinear)
    assert torch.equal(loaded.get_submodule(name).codes, layer.codes)
    _assert_same_state(model, loaded)
    # Codes only: 3 bits; scales and zeros: 2 x 16 bits per group of 32 -> exactly 4 bits/weight, on disk too.
    disk = bits_per_weight_on_disk(folder)
    assert disk["compressed_linears"] == pytest.approx(3 + 32 / 32) == bits_per_weight(model)["compressed_linears"]


def independent_on_disk_bits(folder) -> float:
    """Bytes x 8 over weights of the compressed linears, from safe_open and config.json only."""
    modules = json.loads((folder / "config.json").read_text())["quantization_config"]["modules"]
    nbytes = weights = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        for name, spec in modules.items():
            shape = spec.get("format", spec)
            weights += shape["in_features"] * shape["out_features"]
            for key in keys:
                if key.startswith(name + ".") and key.rsplit(".", 1)[1] not in ("weight", "bias"):
                    t = f.get_tensor(key)
                    nbytes += t.numel() * t.element_size()
    return 8 * nbytes / weights


@pytest.mark.parametrize(("nbits", "group"), [(3, 8), (10, 4), (7, 8)])
def test_on_disk_bits_are_the_bytes_written(nbits, group, tmp_path):
    model = codebook_model(nbits, group=group)
    model.model.layers[0].self_attn.q_proj.init_low_rank(2)  # a merged-adapter slot counts too
    folder = save_compressed(model, tmp_path / "model")
    disk = bits_per_weight_on_disk(folder)
    assert disk["compressed_linears"] == pytest.approx(independent_on_disk_bits(folder), rel=1e-12)
    # Nominal and on disk agree up to each layer's code stream padding (< 8 bits per layer).
    nominal = bits_per_weight(model)
    pad_bits = 8 * 14
    assert 0 <= disk["compressed_linears"] - nominal["compressed_linears"] <= pad_bits / nominal["compressed_params"]
    assert disk["compressed_params"] == nominal["compressed_params"]
    assert measure_bits_on_disk(model) == disk
