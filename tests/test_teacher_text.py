"""Teacher text survives interruption: each finished batch is on disk, and a resumed call generates
only the others and ends with exactly the tokens of an uninterrupted run. A cache shared by runs
(data.teacher_cache_dir) is generated once by processes asking at the same time (file lock), keeps
today's tokens for teacher_seed null and lets runs of other data seeds share one sample with
teacher_seed set. Tiny random Llama, real decode loop, real safetensors files, real processes."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lit_cb.generate
from lit_cb.data.teacher_text import (
    cached_teacher_text,
    sample_sequences,
    shared_cache_folder,
    teacher_fingerprint,
    teacher_windows,
)

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


# -- a teacher-text cache shared by runs (data.teacher_cache_dir, data.teacher_seed) ----------------


def _shared_worker(root: str, log: str, out: str, barrier) -> None:
    """One process asking for the shared cache: logs each batch it generates (slowly, so the other
    process arrives while it is under way) and saves the tokens it gets."""
    import time

    def make(finished, on_batch):
        def logged(i, rows):
            with open(log, "a") as f:
                f.write(f"{os.getpid()} {i}\n")
            time.sleep(0.3)
            on_batch(i, rows)

        return sample_sequences(
            tiny_llama(vocab=64),
            STARTS,
            SEQLEN,
            1.0,
            0.9,
            BATCH,
            SEED,
            progress=False,
            finished=finished,
            on_batch=logged,
        )

    barrier.wait()
    torch.save(cached_teacher_text(root, _fingerprint(), make, shared=True), out)


def test_two_processes_asking_at_once_generate_the_shared_cache_once(tmp_path, counted):
    ctx = multiprocessing.get_context("spawn")
    barrier, log = ctx.Barrier(2), tmp_path / "generated.log"
    procs = [
        ctx.Process(
            target=_shared_worker, args=(str(tmp_path / "shared"), str(log), str(tmp_path / f"{k}.pt"), barrier)
        )
        for k in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = log.read_text().split()
    assert len(set(lines[0::2])) == 1 and lines[1::2] == ["0", "1", "2", "3"]  # one process, every batch once
    a, b = (torch.load(tmp_path / f"{k}.pt") for k in range(2))
    assert torch.equal(a, b) and a.shape == (len(STARTS), SEQLEN)
    folder = shared_cache_folder(tmp_path / "shared", _fingerprint())
    assert folder.parent == tmp_path / "shared" and len(folder.name) == 16
    assert set(_hashes(folder)) == {"tokens.safetensors", "meta.json", "lock"}

    # The same fingerprint again (another run, this process): loaded, nothing generated.
    model = tiny_llama(vocab=64)
    again = cached_teacher_text(tmp_path / "shared", _fingerprint(), _make(model), shared=True)
    assert counted["calls"] == [] and torch.equal(again, a)
    # As a DDP rank that does not write: loaded too.
    assert torch.equal(cached_teacher_text(tmp_path / "shared", _fingerprint(), _make(model), False, True), a)
    assert counted["calls"] == []

    # Another temperature: another folder, the first one untouched; the tokens are those of a per-run cache.
    before = _hashes(folder)
    hotter = cached_teacher_text(tmp_path / "shared", _fingerprint(temperature=2.0), _make_at(model, 2.0), shared=True)
    other = shared_cache_folder(tmp_path / "shared", _fingerprint(temperature=2.0))
    assert other != folder and (other / "meta.json").is_file() and _hashes(folder) == before
    assert counted["calls"] == [0, 1, 2, 3] and not torch.equal(hotter, a)
    assert torch.equal(cached_teacher_text(tmp_path / "run", _fingerprint(), _make(model)), a)


def _make_at(model, temperature):
    def make(finished, on_batch):
        return sample_sequences(
            model, STARTS, SEQLEN, temperature, 0.9, BATCH, SEED, progress=False, finished=finished, on_batch=on_batch
        )

    return make


def test_a_shared_generation_stopped_part_way_resumes_and_a_reader_writes_nothing(tmp_path, counted):
    model = tiny_llama(vocab=64)
    root = tmp_path / "shared"
    folder = shared_cache_folder(root, _fingerprint())
    # A non-writing DDP rank with nothing finished generates itself and writes nothing.
    alone = cached_teacher_text(root, _fingerprint(), _make(model), write=False, shared=True)
    assert not root.exists() and counted["calls"] == [0, 1, 2, 3]
    counted["calls"].clear()
    counted["stop_at"] = 2
    with pytest.raises(_Stop):
        cached_teacher_text(root, _fingerprint(), _make(model), shared=True)
    assert set(_hashes(folder)) == {"lock", "progress.json", "part_00000.safetensors", "part_00001.safetensors"}
    counted["calls"].clear()
    resumed = cached_teacher_text(root, _fingerprint(), _make(model), shared=True)
    assert counted["calls"] == [2, 3] and torch.equal(resumed, alone)
    # Files lit_cb did not write (beside the lock) are refused, not overwritten.
    stray = shared_cache_folder(root, _fingerprint(top_p=0.5))
    stray.mkdir()
    (stray / "tokens.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="holds files but no meta.json"):
        cached_teacher_text(root, _fingerprint(top_p=0.5), _make(model), shared=True)


# -- through teacher_windows, as a run calls it ------------------------------------------------------------


def _data(tokenizer, **values):
    from lit_cb.data import CompressionDataModule, DataConfig

    base = {"finetune_seqlen": 8, "teacher_seqlen": 16, "num_teacher_samples": 5, "teacher_batch_size": 2}
    return CompressionDataModule(tokenizer, DataConfig(**{**base, **values}))


def _windows(model, dm, run_dir):
    return teacher_windows(model, dm, {"weights": "tiny"}, "cpu", run_dir, progress=False)


def test_shared_cache_keeps_today_s_tokens_and_teacher_seed_shares_them_across_data_seeds(
    tmp_path, tiny_tokenizer, monkeypatch
):
    model = tiny_llama(vocab=len(tiny_tokenizer))
    shared = str(tmp_path / "shared")
    # teacher_seed null: the tokens of today's per-run cache, in the shared folder or not.
    own = _windows(model, _data(tiny_tokenizer, seed=1), tmp_path / "own")
    assert set(_hashes(tmp_path / "own")) == {"teacher_text/tokens.safetensors", "teacher_text/meta.json"}
    same = _windows(model, _data(tiny_tokenizer, seed=1, teacher_cache_dir=shared), tmp_path / "run_a")
    assert own.shape == (10, 8) and torch.equal(same, own)
    (folder,) = (tmp_path / "shared").iterdir()
    record = json.loads((tmp_path / "run_a" / "teacher_text.json").read_text())
    assert record["folder"] == str(folder) and record["fingerprint"]["seed"] == 6
    assert "first_tokens_sha256" in record["fingerprint"]
    # Another data seed with teacher_seed null: other prompts (the split differs), another folder.
    _windows(model, _data(tiny_tokenizer, seed=2, teacher_cache_dir=shared), tmp_path / "run_b")
    assert len(list((tmp_path / "shared").iterdir())) == 2

    # teacher_seed set: runs of different data seeds share one folder and one sample.
    import lit_cb.data.teacher_text as tt

    calls = []
    original = tt.sample_sequences
    monkeypatch.setattr(tt, "sample_sequences", lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    s0 = _windows(model, _data(tiny_tokenizer, seed=0, teacher_seed=0, teacher_cache_dir=shared), tmp_path / "s0")
    s1 = _windows(model, _data(tiny_tokenizer, seed=1, teacher_seed=0, teacher_cache_dir=shared), tmp_path / "s1")
    assert calls == [1] and torch.equal(s0, s1) and not torch.equal(s0, own)
    assert len(list((tmp_path / "shared").iterdir())) == 3
    per_run = _windows(model, _data(tiny_tokenizer, seed=1, teacher_seed=0), tmp_path / "s1_own")
    assert torch.equal(per_run, s0)  # the same tokens in a per-run cache


def test_a_resume_on_other_shared_tokens_is_refused(tmp_path, tiny_tokenizer):
    model = tiny_llama(vocab=len(tiny_tokenizer))
    dm = _data(tiny_tokenizer, teacher_seed=3, teacher_cache_dir=str(tmp_path / "shared"))
    first = _windows(model, dm, tmp_path / "run")
    # Moved elsewhere (data.teacher_cache_dir is resumable): found or made again, the same tokens.
    moved = _data(tiny_tokenizer, teacher_seed=3, teacher_cache_dir=str(tmp_path / "moved"))
    assert torch.equal(_windows(model, moved, tmp_path / "run"), first)
    # The shared cache replaced by other tokens of the same shape: the resumed run refuses.
    (folder,) = (tmp_path / "moved").iterdir()
    save_file({"input_ids": first.reshape(5, 16).flip(1).contiguous()}, str(folder / "tokens.safetensors"))
    with pytest.raises(ValueError, match=r"is not the one this run started with.*start the run fresh"):
        _windows(model, moved, tmp_path / "run")
    # Switching from a per-run cache to a shared one is checked against the per-run tokens.
    _windows(model, _data(tiny_tokenizer, teacher_seed=3), tmp_path / "run2")
    with pytest.raises(ValueError, match="is not the one this run started with"):
        _windows(model, moved, tmp_path / "run2")


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.teacher_seed=-1", "data.teacher_seed=-1 must be an integer >= 0 or null"),
        ("data.teacher_seed=true", "data.teacher_seed=True must be null or an int"),
        ("data.teacher_cache_dir=''", "data.teacher_cache_dir='' must be a non-empty folder path or null"),
    ],
)
def test_bad_teacher_values_are_refused_before_any_work(tmp_path, capsys, override, message):
    from lit_cb.cli import main

    out = tmp_path / "runs"
    assert main(["run", "recipes/smollm2_codebook_best.py", override, f"output_dir={out}"]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_shorter_sequences_are_packed_into_windows_in_generation_order(tmp_path, tiny_tokenizer):
    """teacher_seqlen dividing finetune_seqlen: each window holds finetune/teacher sequences back to back,
    each opening on its own document-start token, in the order they were sampled."""
    model = tiny_llama(vocab=len(tiny_tokenizer))
    dm = _data(tiny_tokenizer, teacher_seqlen=4, num_teacher_samples=6, teacher_batch_size=4)
    windows = _windows(model, dm, tmp_path / "run")
    assert windows.shape == (3, 8)
    starts = dm.document_starts(6, 5, "train")  # teacher_seed null: data.seed + 5, the run's own split
    assert torch.equal(windows.reshape(6, 4)[:, 0], starts.to(windows.dtype))
    raw = sample_sequences(model, starts, 4, 1.0, 1.0, 4, 5, "cpu", progress=False)
    assert torch.equal(windows.reshape(6, 4), raw)


def test_packing_needs_whole_windows():
    from lit_cb.data import DataConfig

    with pytest.raises(ValueError, match=r"data.num_teacher_samples=3 must be a multiple of 4: data.teacher_seqlen=2"):
        DataConfig(finetune_seqlen=8, teacher_seqlen=2, num_teacher_samples=3)
    with pytest.raises(ValueError, match=r"data.teacher_seqlen=3 must be a multiple of data.finetune_seqlen=8"):
        DataConfig(finetune_seqlen=8, teacher_seqlen=3, num_teacher_samples=8)
    assert DataConfig(finetune_seqlen=8, teacher_seqlen=2, num_teacher_samples=8).teacher_sequence_length == 2
