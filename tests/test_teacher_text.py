"""Teacher text survives interruption: each finished batch is on disk, and a resumed call generates
only the others and ends with exactly the tokens of an uninterrupted run. Tiny random Llama, real
decode loop, real safetensors files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

import lit_cb.generate
from lit_cb.data.teacher_text import cached_teacher_text, sample_sequences, teacher_fingerprint

from .conftest import tiny_llama

SEED = 3
BATCH = 2
STARTS = torch.tensor([3, 5, 7, 9, 11, 13, 15])  # 4 batches: 2, 2, 2 and 1 rows
SEQLEN = 9


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _fingerprint(**changes):
    args = {"temperature": 1.0, "top_p": 0.9, **changes}
    return teacher_fingerprint(
        {"weights": "tiny"}, len(STARTS), SEQLEN, args["temperature"], args["top_p"], BATCH, SEED, torch.float32
    )


class _Stop(KeyboardInterrupt):
    pass


@pytest.fixture
def counted(monkeypatch):
    """Count the batches generate() is asked for (batch index from its seed); stop once at ``stop_at``."""
    state = {"calls": [], "stop_at": None}
    original = lit_cb.generate.generate

    def counting(*args, **kwargs):
        batch = kwargs["seed"] - SEED * 1_000_003
        state["calls"].append(batch)
        if batch == state["stop_at"]:
            state["stop_at"] = None
            raise _Stop(f"interrupted in batch {batch}")
        return original(*args, **kwargs)

    monkeypatch.setattr(lit_cb.generate, "generate", counting)
    return state


def _make(model):
    def make(finished, on_batch):
        return sample_sequences(
            model, STARTS, SEQLEN, 1.0, 0.9, BATCH, SEED, progress=False, finished=finished, on_batch=on_batch
        )

    return make


@pytest.mark.parametrize("stop_at", [1, 3])
def test_interrupted_generation_resumes_to_the_same_tokens(tmp_path, counted, stop_at):
    model = tiny_llama(vocab=64)
    fp = _fingerprint()
    reference = cached_teacher_text(tmp_path / "a", fp, _make(model))
    assert counted["calls"] == [0, 1, 2, 3] and reference.shape == (7, SEQLEN)
    assert set(_hashes(tmp_path / "a")) == {"teacher_text/tokens.safetensors", "teacher_text/meta.json"}

    counted["calls"].clear()
    counted["stop_at"] = stop_at
    with pytest.raises(_Stop):
        cached_teacher_text(tmp_path / "b", fp, _make(model))
    folder = tmp_path / "b" / "teacher_text"
    parts = {f"part_{i:05d}.safetensors" for i in range(stop_at)}
    assert set(_hashes(folder)) == {"progress.json", *parts}
    progress = json.loads((folder / "progress.json").read_text())
    assert progress == {"fingerprint": fp, "finished": list(range(stop_at))}

    # Other settings do not reuse or overwrite the unfinished generation either.
    before = _hashes(folder)
    with pytest.raises(ValueError, match=r"other settings \(top_p: 0.9 -> 0.8\).*not overwritten"):
        cached_teacher_text(tmp_path / "b", _fingerprint(top_p=0.8), _make(model))
    assert _hashes(folder) == before

    counted["calls"].clear()
    resumed = cached_teacher_text(tmp_path / "b", fp, _make(model))
    assert counted["calls"] == list(range(stop_at, 4))  # the finished batches are not generated again
    assert torch.equal(resumed, reference)
    assert _hashes(folder) == _hashes(tmp_path / "a" / "teacher_text")  # the same final files, parts gone


def test_a_stop_between_the_final_write_and_the_clean_up_reuses_the_final_file(tmp_path, counted, monkeypatch):
    import lit_cb.data.teacher_text as tt

    model = tiny_llama(vocab=64)
    fp = _fingerprint()
    monkeypatch.setattr(tt._Parts, "remove", lambda self: (_ for _ in ()).throw(_Stop("before the clean-up")))
    with pytest.raises(_Stop):
        cached_teacher_text(tmp_path, fp, _make(model))
    folder = tmp_path / "teacher_text"
    assert {"meta.json", "tokens.safetensors", "progress.json", "part_00003.safetensors"} <= set(_hashes(folder))
    monkeypatch.undo()
    counted["calls"].clear()
    tokens = cached_teacher_text(tmp_path, fp, _make(model))
    assert counted["calls"] == [] and tokens.shape == (7, SEQLEN)
    assert set(_hashes(folder)) == {"tokens.safetensors", "meta.json"}


def test_a_damaged_part_is_refused_not_regenerated(tmp_path, counted):
    model = tiny_llama(vocab=64)
    counted["stop_at"] = 2
    with pytest.raises(_Stop):
        cached_teacher_text(tmp_path, _fingerprint(), _make(model))
    part = tmp_path / "teacher_text" / "part_00001.safetensors"
    part.write_bytes(part.read_bytes()[:20])
    counted["calls"].clear()
    with pytest.raises(ValueError, match=r"part_00001.safetensors is missing or corrupt.*move .*teacher_text away"):
        cached_teacher_text(tmp_path, _fingerprint(), _make(model))
    assert counted["calls"] == []


def test_finished_batches_must_fit_the_request():
    model = tiny_llama(vocab=64)
    with pytest.raises(ValueError, match=r"finished batch 4 holds shape \[2, 9\].*indices 0..3"):
        sample_sequences(model, STARTS, SEQLEN, batch_size=BATCH, finished={4: torch.zeros(2, 9)}, progress=False)
    wrong_start = torch.full((2, SEQLEN), 1)
    with pytest.raises(ValueError, match="finished batch 0 starts with other first tokens"):
        sample_sequences(model, STARTS, SEQLEN, batch_size=BATCH, finished={0: wrong_start}, progress=False)
