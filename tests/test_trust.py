"""Trustworthy runs and files (issue 13): resume bound to what made it, checksummed outputs, no
pickle, bad input refused before any work, and a resumed recovery equal to an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from safetensors.torch import load_file, save_file

from lit_cb.config import load_config
from lit_cb.pipeline import run
from lit_cb.serialization import load_compressed

from .conftest import TINY_RUN, resume_equals, tiny_llama

FAST = {
    **TINY_RUN,
    "recovery.max_steps": 0,
    "eval.recovered": False,
}


def _cfg(model_dir: Path, out: Path, **extra):
    values = {**FAST, "output_dir": str(out), "model.name": str(model_dir), **extra}
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


def _save_model(path: Path, tokenizer, seed: int = 0, hidden: int = 64, intermediate: int = 128) -> Path:
    model = tiny_llama(num_layers=2, vocab=len(tokenizer), seed=seed, hidden=hidden, intermediate=intermediate)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    return _save_model(tmp_path / "tiny", tiny_tokenizer)


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- recovery resume ----------------------------------------------------------------------------


class _Crash(RuntimeError):
    pass


RESUME = {"recovery.max_steps": 16, "recovery.lora_dropout": 0.1}  # 8 batches per epoch, checkpoints every 4 steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("uninterrupted")
    model = _save_model(root / "model", tiny_tokenizer)
    cfg = _cfg(model, root / "out", **RESUME)
    run(cfg)
    return model, load_file(str(cfg.run_dir / "model" / "model.safetensors"))


@pytest.mark.parametrize("crash_checkpoint", [True, False], ids=["crash-checkpoint", "periodic-checkpoint"])
def test_recovery_resumed_after_a_crash_equals_an_uninterrupted_run(
    uninterrupted, tmp_path, monkeypatch, crash_checkpoint
):
    """A crash in step 11 (mid-epoch), then a resume to step 16, gives bit-identical weights to 16
    uninterrupted steps, with LoRA dropout on (the RNG stream is restored too). With the crash
    checkpoint nothing is lost; without it (as after kill -9) the run resumes from the periodic
    checkpoint of step 8, written at an epoch's end."""
    import lit_cb.callbacks
    import lit_cb.recovery

    model_dir, reference = uninterrupted
    original = lit_cb.recovery.RecoveryModule.training_step

    def crashing_step(self, batch, batch_idx):
        if self.trainer.global_step == 10:
            raise _Crash("simulated crash")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(lit_cb.recovery.RecoveryModule, "training_step", crashing_step)
    if not crash_checkpoint:
        monkeypatch.setattr(lit_cb.callbacks.CrashCheckpoint, "on_exception", lambda *a, **k: None)
    cfg = _cfg(model_dir, tmp_path / "b", **RESUME)
    with pytest.raises(_Crash):
        run(cfg)
    ckpt = torch.load(cfg.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == (10 if crash_checkpoint else 8)
    monkeypatch.undo()
    resume_equals(cfg, reference)


@pytest.mark.parametrize("at_step", [8, 11], ids=["epoch-end", "mid-epoch"])
def test_recovery_stopped_by_sigterm_then_resumed_equals_an_uninterrupted_run(
    uninterrupted, tmp_path, monkeypatch, at_step
):
    """SIGTERM (what a scheduler or ``kill`` sends) during a recovery step: Lightning's handler lets
    the step finish and stops after it, the crash checkpoint stores that step, and the resumed run
    ends bit-identical to 16 uninterrupted steps. Unlike an exception inside ``training_step``
    (above), the stop comes after the optimizer and scheduler steps and the batch-end hooks, and a
    real signal goes through Lightning's signal connector."""
    import lit_cb.recovery

    model_dir, reference = uninterrupted
    original = lit_cb.recovery.RecoveryModule.training_step

    def signalled_step(self, batch, batch_idx):
        if self.trainer.global_step == at_step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(lit_cb.recovery.RecoveryModule, "training_step", signalled_step)
    cfg = _cfg(model_dir, tmp_path / "b", **RESUME)
    with pytest.raises(SIGTERMException) as stopped:
        run(cfg)
    assert stopped.value.code == 143  # not Lightning's bare SystemExit (status 0, read as success)
    ckpt = torch.load(cfg.run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == at_step  # the signalled step finished and was saved
    monkeypatch.undo()
    metrics = run(cfg)
    assert metrics["stages"]["recover"]["resumed_from"].endswith("last.ckpt")
    assert metrics["stages"]["recover"]["steps"] == RESUME["recovery.max_steps"]
    resumed = load_file(str(cfg.run_dir / "model" / "model.safetensors"))
    assert reference.keys() == resumed.keys()
    worst = max((reference[k].float() - resumed[k].float()).abs().max().item() for k in reference)
    assert worst == 0.0, f"resumed run differs from the uninterrupted one by up to {worst}"


# -- one finished run that the refused runs below must leave untouched ---------------------------


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_tokenizer):
    """A finished run (compression + 2 recovery steps) on its own model and calibration file."""
    root = tmp_path_factory.mktemp("finished")
    model = _save_model(root / "model", tiny_tokenizer)
    calib = root / "calib.jsonl"
    _write_docs(calib)
    extra = {"recovery.max_steps": 2, "data.calibration_source": str(calib), "data.calibration_sampling": "concat"}
    cfg = _cfg(model, root / "out", **extra)
    run(cfg)
    return {"root": root, "model": model, "calib": calib, "cfg": cfg, "extra": extra}


def _write_docs(path: Path, n: int = 60, offset: int = 0) -> None:
    from lit_cb.data.datamodule import load_documents

    docs = load_documents("c4")[offset : offset + n]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")


def _refused(finished, overrides: dict, match: list[str], exc=(ValueError, FileNotFoundError)) -> str:
    """Run ``finished``'s config with ``overrides`` into its run folder: it must raise, naming
    every string of ``match``, and leave every file of the run folder byte-identical."""
    run_dir = finished["cfg"].run_dir
    before = _tree_hashes(run_dir)
    with pytest.raises(exc) as info:
        run(_cfg(finished["model"], finished["root"] / "out", **{**finished["extra"], **overrides}))
    message = str(info.value)
    for text in match:
        assert text in message, f"{text!r} not in error message:\n{message}"
    assert _tree_hashes(run_dir) == before, "a refused run changed the existing run folder"
    return message


def test_resuming_a_finished_run_with_the_same_inputs_is_allowed(finished):
    run_dir = finished["cfg"].run_dir
    assert json.loads((run_dir / "fingerprint.json").read_text())["model"]["weights"]
    progress = json.loads((run_dir / "blocks" / "progress.json").read_text())
    assert progress["fingerprint"]["model"] == json.loads((run_dir / "fingerprint.json").read_text())["model"]
    meta = json.loads((run_dir / "model" / "compression.json").read_text())
    assert meta["fingerprint"]["config"]["compression.method"] == "codebook"
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # no pickle needed
    assert ckpt["callbacks"]["CompressionCallback"]["fingerprint"]["version"]


def test_changed_compression_config_refuses_to_resume_and_names_the_key(finished):
    message = _refused(
        finished,
        {"compression.method_config": "{in_group_size: 8, nbits: 2, kmeans_iters: 2}"},
        ["compression.method_config.in_group_size", "compression.method_config.nbits", "overwrite=true", "run_name"],
    )
    assert "4 -> 8" in message or "4 -> 8".replace(" ", "") in message.replace(" ", "")


def test_changed_model_of_the_same_shape_refuses_to_resume(finished, tiny_tokenizer):
    other = _save_model(finished["root"] / "model", tiny_tokenizer, seed=1)  # same path, same shape, new weights
    try:
        _refused(finished, {}, ["model: weights changed", "overwrite=true"])
    finally:
        _save_model(finished["root"] / "model", tiny_tokenizer, seed=0)
    assert other == finished["model"]


def test_changed_calibration_data_refuses_to_resume(finished):
    original = finished["calib"].read_bytes()
    _write_docs(finished["calib"], offset=100)
    try:
        _refused(finished, {}, ["data: calibration_source changed", "overwrite=true"])
    finally:
        finished["calib"].write_bytes(original)


def test_blocks_of_another_model_are_refused_by_the_library_too(tmp_path):
    from lit_cb.compress import BlockCheckpoints, CompressionConfig
    from lit_cb.fingerprint import FingerprintMismatch

    cfg = CompressionConfig(method_config={"in_group_size": 4, "nbits": 4})
    first = {"config": {}, "model": {"weights": "a"}, "data": {}, "version": "1"}
    ckpts = BlockCheckpoints(tmp_path, cfg, first)
    ckpts.save(0, torch.nn.Linear(2, 2), {}, {"layers": []})
    BlockCheckpoints(tmp_path, cfg, first)  # same inputs: resumes
    with pytest.raises(FingerprintMismatch, match="model: weights changed"):
        BlockCheckpoints(tmp_path, cfg, {**first, "model": {"weights": "b"}})


def test_resume_false_refuses_an_existing_run_and_overwrite_moves_it_aside(finished, tmp_path):
    import shutil

    _refused(finished, {"resume": False}, ["resume=false would overwrite", "overwrite=true", "run_name"])
    # overwrite=true on a copy: the old folder is moved aside intact, the new run starts fresh.
    out = tmp_path / "out"
    shutil.copytree(finished["cfg"].run_dir, out / "tiny")
    before = _tree_hashes(out / "tiny")
    cfg = _cfg(finished["model"], out, **{**finished["extra"], "overwrite": True, "recovery.max_steps": 0})
    metrics = run(cfg)
    assert metrics["stages"]["recover"]["resumed_from"] is None
    (aside,) = out.glob("tiny.replaced-*")
    assert _tree_hashes(aside) == before
    assert not (out / "tiny" / "checkpoints" / "last.ckpt").exists()


# -- bad input, refused before any work, naming the value ------------------------------------------


BAD_CONFIG = [
    ({"trainer.accumulate_grad_batches": 0}, ["trainer.accumulate_grad_batches=0", ">= 1"]),
    ({"trainer.accumulate_grad_batches": "two"}, ["trainer.accumulate_grad_batches='two'", "must be an int"]),
    ({"data.batch_size": 0}, ["data.batch_size=0", "positive integer"]),
    ({"data.batch_size": "'4'"}, ["data.batch_size='4'", "must be an int"]),
    ({"eval.batch_size": 0}, ["eval.batch_size=0", ">= 1"]),
    ({"trainer.log_every_n_steps": 0}, ["trainer.log_every_n_steps=0", ">= 1"]),
    ({"compression.forward_batch_size": 0}, ["compression.forward_batch_size=0", ">= 1"]),
    ({"recovery.lr": -1}, ["recovery.lr=-1", "> 0"]),
    ({"recovery.max_stepz": 3}, ["recovery.max_stepz", "allowed"]),
    ({"trainer.precision": "fp8"}, ["trainer.precision='fp8'", "allowed"]),
    ({"compression.targets": "'('"}, ["compression.targets='('", "not a valid regular expression"]),
]


@pytest.mark.parametrize(
    "overrides,match", BAD_CONFIG, ids=[next(iter(o)) + "=" + str(next(iter(o.values()))) for o, _ in BAD_CONFIG]
)
def test_bad_config_values_are_refused_and_named(finished, overrides, match):
    _refused(finished, overrides, match)


def test_target_pattern_matching_no_linear_is_refused_after_loading(finished):
    _refused(
        finished,
        {"compression.targets": "'attn\\.qkv_proj$'"},
        ["compression.targets='attn\\\\.qkv_proj$'", "matches no linear", "self_attn.q_proj"],
    )


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", ["data.calibration_source", "is empty"]),
        (b"  \n\n ", ["data.calibration_source", "is empty"]),
        ('{"text": "caf\xe9"}\n'.encode("latin-1"), ["data.calibration_source", "is not UTF-8", "line 1"]),
        (b'{"text": "ok"}\n{"text": broken\n', ["data.calibration_source", "line 2", "is not JSON"]),
    ],
    ids=["empty", "blank", "latin-1", "bad-json"],
)
def test_bad_calibration_file_is_refused_naming_it(finished, tmp_path, content, match):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(content)
    _refused(finished, {"data.calibration_source": str(bad)}, [*match, str(bad)])


def test_missing_calibration_file_is_refused(finished, tmp_path):
    _refused(
        finished, {"data.calibration_source": str(tmp_path / "nope.jsonl")}, ["data.calibration_source", "nope.jsonl"]
    )


def test_too_few_calibration_tokens_are_refused_before_work(finished, tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "the cat"}\n')
    _refused(finished, {"data.calibration_source": str(short)}, ["fewer than one window of 32"])


def test_group_size_not_dividing_a_width_is_refused_naming_the_layer(finished, tiny_tokenizer, tmp_path):
    odd = _save_model(tmp_path / "odd", tiny_tokenizer, intermediate=124)
    before = _tree_hashes(finished["cfg"].run_dir)
    cfg = _cfg(
        odd,
        finished["root"] / "out",
        **{**finished["extra"], "compression.method_config": "{in_group_size: 8, nbits: 4}"},
    )
    with pytest.raises(ValueError) as info:
        run(cfg)
    for text in ("compression.method_config.in_group_size=8", "model.layers.0.mlp.down_proj", "124"):
        assert text in str(info.value)
    assert _tree_hashes(finished["cfg"].run_dir) == before


def test_nan_weights_are_refused_naming_the_layer(finished, tiny_tokenizer, tmp_path):
    model = tiny_llama(num_layers=2, vocab=len(tiny_tokenizer))
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 5] = float("nan")
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    model.save_pretrained(tmp_path / "nan")
    tiny_tokenizer.save_pretrained(tmp_path / "nan")
    before = _tree_hashes(finished["cfg"].run_dir)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight holds 1 NaN/Inf"):
        run(_cfg(tmp_path / "nan", finished["root"] / "out", **finished["extra"]))
    assert _tree_hashes(finished["cfg"].run_dir) == before


def test_truncated_last_ckpt_is_refused_naming_it_and_how_to_recover(finished, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished["cfg"].run_dir, out / "tiny")
    last = out / "tiny" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    before = _tree_hashes(out / "tiny")
    with pytest.raises(ValueError) as info:
        run(_cfg(finished["model"], out, **finished["extra"]))
    assert str(last) in str(info.value) and "resume without one" in str(info.value)
    assert _tree_hashes(out / "tiny") == before


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    from fractions import Fraction

    from lit_cb.integrity import IntegrityError, load_checkpoint

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Fraction(1, 3)}, path)
    with pytest.raises(IntegrityError, match="evil.ckpt"):
        load_checkpoint(path)


# -- model folder: manifest and value checks on load -------------------------------------------------


@pytest.fixture
def model_copy(finished, tmp_path):
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(finished["cfg"].run_dir / "model", dst)
    return dst


def test_every_file_of_the_model_folder_is_checked(model_copy):
    from lit_cb.integrity import IntegrityError

    load_compressed(model_copy)  # intact: loads
    files = sorted(p for p in model_copy.rglob("*") if p.is_file())
    assert {p.name for p in files} >= {"model.safetensors", "config.json", "compression.json", "manifest.json"}
    for path in files:
        original = path.read_bytes()
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))
        try:
            with pytest.raises((IntegrityError, ValueError)) as info:
                load_compressed(model_copy)
            assert path.name in str(info.value), f"flipping a byte of {path.name}: {info.value}"
        finally:
            path.write_bytes(original)


def test_a_damaged_manifest_record_that_still_parses_is_caught(model_copy):
    """A tensor hash is consulted only when its file changed; the manifest's own digest catches a damaged
    one anyway. A manifest written before that digest existed still loads."""
    from lit_cb.integrity import IntegrityError

    path = model_copy / "manifest.json"
    manifest, intact = json.loads(path.read_text()), json.loads(path.read_text())
    name = next(iter(manifest["tensors"]["model.safetensors"]))
    digest = manifest["tensors"]["model.safetensors"][name]
    manifest["tensors"]["model.safetensors"][name] = ("0" if digest[0] != "0" else "1") + digest[1:]
    path.write_text(json.dumps(manifest, indent=1))
    with pytest.raises(IntegrityError, match="manifest.json is corrupt.*do not match its own sha256"):
        load_compressed(model_copy)
    del intact["self_sha256"]
    path.write_text(json.dumps(intact, indent=1))
    load_compressed(model_copy)


def test_swapped_tensors_of_the_same_shape_are_refused_naming_them(model_copy):
    from lit_cb.integrity import IntegrityError

    path = model_copy / "model.safetensors"
    tensors = load_file(str(path))
    a, b = "model.layers.0.self_attn.q_proj.codebooks", "model.layers.1.self_attn.q_proj.codebooks"
    assert tensors[a].shape == tensors[b].shape and not torch.equal(tensors[a], tensors[b])
    tensors[a], tensors[b] = tensors[b], tensors[a]
    save_file(tensors, str(path))
    with pytest.raises(IntegrityError) as info:
        load_compressed(model_copy)
    assert f"tensor {a} holds the values of {b}" in str(info.value)
    assert f"tensor {b} holds the values of {a}" in str(info.value)


def test_codes_out_of_range_are_refused_naming_the_layer(model_copy):
    """Another tool wrote codes >= 2**B (with a consistent manifest): the value check refuses. Packed codes
    (format version 2) hold exactly B bits each, so the folder is rewritten in version 1, one code per uint8."""
    from lit_cb.integrity import IntegrityError, write_manifest

    model, _, _ = load_compressed(model_copy)
    config = json.loads((model_copy / "config.json").read_text())
    qc = config["quantization_config"]
    qc["format_version"] = 1
    path = model_copy / "model.safetensors"
    tensors = load_file(str(path))
    for module, spec in qc["modules"].items():
        spec.pop("codes_packed", None)
        tensors[f"{module}.codes"] = model.get_submodule(module).codes.clone()
    (model_copy / "config.json").write_text(json.dumps(config))
    name = "model.layers.1.mlp.down_proj.codes"
    tensors[name][0, 0, 0] = 16  # nbits=4: allowed codes are 0..15
    save_file(tensors, str(path))
    write_manifest(model_copy)
    with pytest.raises(IntegrityError, match=r"layer model\.layers\.1\.mlp\.down_proj.*\[0, 16\)"):
        load_compressed(model_copy)


def test_truncated_safetensors_is_refused_naming_it(model_copy):
    from lit_cb.integrity import IntegrityError

    path = model_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match=r"model\.safetensors: truncated"):
        load_compressed(model_copy)


def test_truncated_block_checkpoint_is_refused_naming_it(finished, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(finished["cfg"].run_dir, out / "tiny")
    block = out / "tiny" / "blocks" / "block_001.safetensors"
    block.write_bytes(block.read_bytes()[:-10])
    before = _tree_hashes(out / "tiny")
    with pytest.raises(ValueError) as info:
        run(_cfg(finished["model"], out, **finished["extra"]))
    assert str(block) in str(info.value) and "compress from scratch" in str(info.value)
    assert _tree_hashes(out / "tiny") == before


def test_cli_prints_a_refusal_without_traceback(finished, capsys):
    from lit_cb.cli import main

    run_dir = finished["cfg"].run_dir
    before = _tree_hashes(run_dir)
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "smollm2_codebook.py"
    rc = main(["run", str(recipe), f"output_dir={run_dir.parent}", "run_name=tiny", "resume=false"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "resume=false would overwrite" in err and "Traceback" not in err
    assert _tree_hashes(run_dir) == before


def test_a_key_added_to_lit_cb_after_a_run_does_not_stop_it_resuming():
    """A run saved before recovery.low_rank_bits existed ran as its default (16) does: resumable with
    the default, refused with another value, naming the key."""
    from lit_cb.fingerprint import config_defaults, differences

    current = {"config": dict(config_defaults())}
    stored = {"config": {k: v for k, v in current["config"].items() if k != "recovery.low_rank_bits"}}
    assert differences(stored, current) == []
    changed = {"config": {**current["config"], "recovery.low_rank_bits": 8}}
    assert differences(stored, changed) == ["config recovery.low_rank_bits: '<absent>' -> 8"]
    # a key the current config lacks (removed from lit_cb) is still a difference
    assert differences(current, stored) == ["config recovery.low_rank_bits: 16 -> '<absent>'"]


def test_a_model_config_written_by_another_transformers_release_is_the_same_model(tmp_path):
    """Blocks compressed under one transformers release resume under another: config.json files that differ only in
    the writer's transformers_version are the same model. A changed field is still a change, and a fingerprint made
    before config_semantic existed is compared by the file's bytes, as it was made."""
    from lit_cb.fingerprint import differences, model_identity

    def folder(name: str, **fields) -> dict:
        path = tmp_path / name
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"same weights")
        config = {"model_type": "llama", "hidden_size": 64, "transformers_version": "5.17.0", **fields}
        (path / "config.json").write_text(json.dumps(config, indent=2))
        return {"model": model_identity(str(path))}

    old = folder("a")
    new = folder("b", transformers_version="5.25.0")
    wider = folder("c", hidden_size=128)
    for ident in (old, new, wider):
        ident["model"]["name"] = "m"  # one model name, as a resume in the same place has
    assert old["model"]["config"] != new["model"]["config"]  # the bytes differ ...
    assert differences(old, new) == []  # ... the model does not
    assert differences(old, wider) == [
        f"model: config, config_semantic changed (model identity {old['model']} -> {wider['model']})"
    ]
    legacy = {"model": {k: v for k, v in old["model"].items() if k != "config_semantic"}}
    assert differences(legacy, old) == []  # same bytes: resumes
    assert differences(legacy, new)[0].startswith("model: config changed")  # other bytes, nothing else to go by


def test_teacher_text_caches_keep_their_key_when_the_model_identity_gains_a_field():
    """The shared teacher-text cache folder is the hash of the teacher fingerprint: config_semantic is left out of it,
    so caches made before it existed (and carried between sessions) are still found."""
    from lit_cb.data.teacher_text import teacher_fingerprint

    ident = {"name": "m", "weights": "w", "config": "c"}
    args = (4, 16, 1.0, 0.95, 2, 0, torch.float16)
    assert teacher_fingerprint({**ident, "config_semantic": "s"}, *args) == teacher_fingerprint(ident, *args)
