"""Distillation text sampled from the float model (LLM-QAT's data-free recipe).

The shipped C4 sample holds about half a million tokens, so a few hundred recovery steps of 4 x 2048
tokens cycle through it several times. Text the float teacher writes itself is unlimited, and it is
exactly the distribution the compressed student is asked to match under KL distillation.

How a sequence is made: its first token is the first token of a C4 fine-tuning document (drawn with
the data seed from the documents disjoint from the validation ones), the rest is sampled from the
teacher at ``teacher_temperature`` / ``teacher_top_p``, straight through end-of-text tokens (the model
then starts a new document, as C4 windows joined by EOS do). Document starts, not uniform draws from
the vocabulary: a uniform draw over a 49k BPE vocabulary mostly opens on a rare sub-word fragment that
no real text starts with. Generation runs batched on lit_cb's static-KV-cache decode loop
(:func:`lit_cb.generate.generate`, one CUDA graph replay per token on a GPU), seeded.

The sequences are cached in the run folder (``teacher_text/tokens.safetensors`` plus ``meta.json``
with the fingerprint of the model and every setting that changes them), so a resumed run reuses
them; a cache made from other inputs is refused, never overwritten or silently reused.

Generation survives interruption: half a million tokens take minutes even on a GPU, and a run
stopped part-way (a time budget's SIGINT, a crash) used to lose every finished batch. Each batch is
written as it finishes (``part_00000.safetensors``, ... : temporary name, then rename) and listed in
``progress.json`` (the fingerprint and the finished batch indices; written before the first part, so
the folder is known to be lit_cb's). The next call with the same fingerprint reads the finished
batches and generates only the others. Batch ``i`` draws from its own generator seeded with
``seed * 1_000_003 + i`` (nothing carries from one batch to the next), so the resumed tokens are
exactly those of an uninterrupted run. When every batch is done the final ``tokens.safetensors`` and
``meta.json`` are written as before, and only then are the parts and ``progress.json`` removed.

Seeds: by default (``data.teacher_seed: null``) the sampling seed is ``data.seed + 5`` and the first
tokens come from the training documents of ``data.seed``'s split, as before. ``data.teacher_seed: S``
seeds the teacher text alone with ``S`` and draws the first tokens from all fine-tuning documents, so
runs of other data seeds (calibration, compression, data order) can share one teacher sample. The
price: a prompt may be the first token of a document that a run holds out for validation; only that
one token, which the teacher then continues with its own text (no validation text is seen).

Sharing: ``data.teacher_cache_dir: DIR`` keeps the cache in ``DIR/<16 hex digits of the sha256 of the
fingerprint>/`` instead of the run folder, so runs with the same settings reuse one generation and
other settings never collide. The fingerprint then also holds the sha256 of the first tokens (the
fine-tuning source, the tokenizer and the document split that the run fingerprint covers for a
per-run cache). Generation holds an exclusive ``fcntl.flock`` on ``DIR/<hash>/lock`` from the first
look to the final write: of two processes asking at once, one generates (batch by batch, resumable,
as above), the other waits and then loads the finished cache. The kernel releases the lock when its
holder dies, so a killed run leaves no stale lock, only its finished parts. Under DDP rank 0 writes as
before; the other ranks read under a shared lock (so they wait for rank 0's generation under way and
load its tokens) and, when nothing is finished yet, generate without writing, as with a per-run cache.
The run records which tokens it trains on in ``<run>/teacher_text.json`` (the folder and their
sha256); a resumed run whose shared cache now holds other tokens (removed and generated again: GPU
sampling is not bit-reproducible) refuses rather than train its checkpoint on other text. flock works
on local file systems; on NFS it depends on the server's lock support.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lit_cb.integrity import atomic_write_text, tensor_sha256

CACHE_DIR = "teacher_text"
TOKENS_FILE = "tokens.safetensors"
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
PART_FILE = "part_{:05d}.safetensors"
LOCK_FILE = "lock"
RECORD_FILE = "teacher_text.json"

OnBatch = Callable[[int, torch.Tensor], None]
"""Called with ``(batch index, [rows, seqlen] CPU token ids)`` after each generated batch."""


def teacher_fingerprint(
    model_identity, num_samples: int, seqlen: int, temperature: float, top_p: float, batch_size: int, seed: int, dtype
) -> dict:
    """What the cached sequences depend on (batch size and dtype too: they change the GPU numerics
    and the order of the random draws)."""
    return {
        # the identity as teacher caches were keyed before config_semantic existed (the shared cache's folder is the
        # hash of this dict, so a new key would orphan every cache made so far)
        "model": {k: v for k, v in model_identity.items() if k != "config_semantic"},
        "num_samples": num_samples,
        "seqlen": seqlen,
        "temperature": float(temperature),
        "top_p": float(top_p),
        "batch_size": batch_size,
        "seed": seed,
        "dtype": str(dtype).removeprefix("torch."),
        "first_token": "c4-document-starts",
    }


@torch.no_grad()
def sample_sequences(
    model: torch.nn.Module,
    first_tokens: torch.Tensor,
    seqlen: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
    finished: Mapping[int, torch.Tensor] | None = None,
    on_batch: OnBatch | None = None,
) -> torch.Tensor:
    """``[len(first_tokens), seqlen]`` token ids: each row starts with its first token and continues
    with ``seqlen - 1`` tokens sampled from ``model`` (no stop at EOS). ``model`` is not changed:
    generation runs on a copy on ``device`` in ``dtype`` (default: the model's).

    Rows go in batches of ``batch_size``; batch ``i`` (rows ``i * batch_size`` onwards) is seeded
    from ``(seed, i)`` alone. ``finished`` maps batch indices to rows made earlier (they are used, not
    generated again); ``on_batch(i, rows)`` is called after each batch generated here."""
    n = first_tokens.shape[0]
    num_batches = -(-n // batch_size)
    finished = dict(finished or {})
    for i, rows in finished.items():
        start = i * batch_size
        if not 0 <= i < num_batches or rows.shape != (min(batch_size, n - start), seqlen):
            raise ValueError(
                f"finished batch {i} holds shape {list(rows.shape)}; batches of {batch_size} rows of {n} x {seqlen} "
                f"tokens have indices 0..{num_batches - 1}"
            )
        if not torch.equal(rows[:, 0].to(first_tokens.dtype), first_tokens[start : start + batch_size].cpu()):
            raise ValueError(f"finished batch {i} starts with other first tokens than the ones given")
    todo = [i for i in range(num_batches) if i not in finished]
    if todo:
        finished.update(
            _generate_batches(
                model,
                first_tokens,
                todo,
                seqlen,
                temperature,
                top_p,
                batch_size,
                seed,
                device,
                dtype,
                progress,
                on_batch,
            )
        )
    return torch.cat([finished[i] for i in range(num_batches)]).to(torch.long)


def _generate_batches(
    model, first_tokens, todo, seqlen, temperature, top_p, batch_size, seed, device, dtype, progress, on_batch
) -> dict[int, torch.Tensor]:
    device = torch.device(device)
    worker = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    if getattr(worker, "generation_config", None) is not None:
        # Sample through end-of-text: the decode loop would pad the rest of a row after its first EOS.
        worker.generation_config.eos_token_id = None
    # Deterministic-kernel mode (trainer.deterministic) may pick kernels that sync and so break the
    # CUDA graph capture of the decode step; the sequences are cached, so bit-reproducibility across
    # GPU runs is not needed here. Restored afterwards.
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        return _sample(
            worker, first_tokens, todo, seqlen, temperature, top_p, batch_size, seed, device, progress, on_batch
        )
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        del worker
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the KV cache and the fp16 copy: give them back before compression


def _sample(
    worker, first_tokens, todo, seqlen, temperature, top_p, batch_size, seed, device, progress, on_batch
) -> dict[int, torch.Tensor]:
    from tqdm.auto import tqdm

    from lit_cb.generate import generate

    made: dict[int, torch.Tensor] = {}
    n = first_tokens.shape[0]
    total = sum(min(batch_size, n - i * batch_size) for i in todo) * seqlen
    bar = tqdm(total=total, desc="teacher text", unit="tok", unit_scale=True, disable=not progress)
    for i in todo:
        start = i * batch_size
        prompt = first_tokens[start : start + batch_size].view(-1, 1).to(device)
        if seqlen > 1:
            new, _ = generate(
                worker,
                None,
                prompt,
                max_new_tokens=seqlen - 1,
                temperature=temperature,
                top_p=top_p,
                seed=seed * 1_000_003 + i,  # from (seed, batch index) only: a resumed run draws the same
                compile_backend="graph",
                warn=lambda message: bar.write(message),
            )
            rows = torch.cat([prompt, new], dim=1).cpu().to(torch.long)
        else:
            rows = prompt.cpu().to(torch.long)
        made[i] = rows
        if on_batch is not None:
            on_batch(i, rows)
        bar.update(rows.numel())
    bar.close()
    return made


def _read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(
            f"{path} is corrupt ({err}); move {path.parent} away to generate the teacher text again"
        ) from err


def _check_fingerprint(stored: dict, fingerprint: dict, folder: Path, hint: str) -> None:
    if stored != fingerprint:
        changed = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
        lines = [f"{k}: {stored.get(k, '<absent>')!r} -> {fingerprint.get(k, '<absent>')!r}" for k in changed]
        raise ValueError(
            f"the teacher text cached in {folder} was made with other settings ({'; '.join(lines)}). It is not "
            f"reused and not overwritten: move that folder away to generate it again, {hint}"
        )


def read_tokens(path: Path | str) -> torch.Tensor:
    """The token ids of a teacher-text file (``tokens.safetensors`` or a part) as int64, whatever integer dtype
    they are stored in (:func:`compact_token_dtype`; int64 in caches written before it)."""
    tokens = load_file(str(path))["input_ids"]
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"{path} holds {tokens.dtype} token ids; expected an integer dtype")
    return tokens.to(torch.long)


def _load_tokens(path: Path, folder: Path, expected: list[int]) -> torch.Tensor:
    try:
        tokens = read_tokens(path)
    except Exception as err:  # noqa: BLE001  any unreadable file: say which and how to recover
        raise ValueError(
            f"{path} is missing or corrupt ({err}); move {folder} away to generate the teacher text again"
        ) from err
    if list(tokens.shape) != expected:
        raise ValueError(f"{path} holds shape {list(tokens.shape)}, {folder} records {expected}")
    return tokens


def compact_token_dtype(tokens: torch.Tensor) -> torch.dtype:
    """The narrowest integer dtype that holds every id of ``tokens`` exactly: ``uint16`` for vocabularies up to
    65,536 (SmolLM2's 49,152, LLaMA's 32,000), else ``int32``, else ``int64``. Token ids are stored in it, a quarter
    of int64's bytes for most models (the 4,096 x 512 teacher sequences: 4 MiB instead of 16), which matters where
    the cache is carried to another machine; they are read back as int64, so the tokens and their sha256 are
    unchanged."""
    if tokens.numel() == 0:
        return torch.uint16
    low, high = int(tokens.min()), int(tokens.max())
    if low >= 0 and high <= 65535:
        return torch.uint16
    if low >= -(2**31) and high < 2**31:
        return torch.int32
    return torch.int64


def write_tokens(path: Path, tokens: torch.Tensor) -> None:
    """Temporary name, then rename: ``path`` is either absent or complete. Stored in
    :func:`compact_token_dtype` (files written as int64 before still load)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({"input_ids": tokens.to(compact_token_dtype(tokens)).contiguous()}, str(tmp))
    tmp.replace(path)


class _Parts:
    """The finished batches of an unfinished generation: ``part_XXXXX.safetensors`` files and
    ``progress.json`` (the fingerprint and the finished indices; rewritten after each part)."""

    def __init__(self, folder: Path, fingerprint: dict, hint: str) -> None:
        self.folder, self.fingerprint, self.hint = folder, fingerprint, hint
        self.path = folder / PROGRESS_FILE
        n, bs = fingerprint["num_samples"], fingerprint["batch_size"]
        self.rows = [min(bs, n - start) for start in range(0, n, bs)]

    def read(self) -> dict[int, torch.Tensor]:
        """The batches finished earlier (none when there is no ``progress.json``)."""
        if not self.path.is_file():
            return {}
        progress = _read_meta(self.path)
        _check_fingerprint(progress.get("fingerprint", {}), self.fingerprint, self.folder, self.hint)
        done = {}
        for i in progress.get("finished", []):
            if not isinstance(i, int) or not 0 <= i < len(self.rows):
                raise ValueError(f"{self.path} lists batch {i!r}; there are {len(self.rows)} batches")
            done[i] = _load_tokens(
                self.folder / PART_FILE.format(i), self.folder, [self.rows[i], self.fingerprint["seqlen"]]
            )
        return done

    def _record(self, finished) -> None:
        text = json.dumps({"fingerprint": self.fingerprint, "finished": sorted(finished)}, indent=1)
        atomic_write_text(self.path, text)

    def start(self, finished: Mapping[int, torch.Tensor]) -> OnBatch:
        """Claim the folder (``progress.json`` before any part) and return the per-batch writer."""
        self.folder.mkdir(parents=True, exist_ok=True)
        done = set(finished)
        self._record(done)

        def on_batch(i: int, rows: torch.Tensor) -> None:
            write_tokens(self.folder / PART_FILE.format(i), rows)
            done.add(i)
            self._record(done)  # after the part's rename: a listed part is always complete

        return on_batch

    def remove(self) -> None:
        """Drop the parts and ``progress.json`` (only once the final file is written)."""
        for i in range(len(self.rows)):
            for name in (PART_FILE.format(i), PART_FILE.format(i) + ".tmp"):
                (self.folder / name).unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


def shared_cache_folder(cache_dir: Path | str, fingerprint: dict) -> Path:
    """The folder of ``fingerprint`` in a shared cache: ``cache_dir/<16 hex digits of its sha256>``."""
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir).expanduser() / digest[:16]


@contextlib.contextmanager
def _locked(folder: Path, mode: int):
    """Hold ``fcntl.flock(mode)`` on ``folder/lock`` (the kernel drops it when the process dies)."""
    with open(folder / LOCK_FILE, "a+b") as f:
        fcntl.flock(f.fileno(), mode)  # waits while another process holds it
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _read_cache(folder: Path, fingerprint: dict, parts: _Parts, clean: bool, hint: str):
    """The finished tokens (a tensor), else the finished batches of an unfinished generation (a dict)."""
    meta_path = folder / META_FILE
    if meta_path.is_file():
        _check_fingerprint(_read_meta(meta_path).get("fingerprint", {}), fingerprint, folder, hint)
        tokens = _load_tokens(folder / TOKENS_FILE, folder, [fingerprint["num_samples"], fingerprint["seqlen"]])
        if clean:
            parts.remove()  # left by a call stopped between the final write and the clean-up
        return tokens
    if not parts.path.is_file() and folder.exists() and any(p.name != LOCK_FILE for p in folder.iterdir()):
        raise ValueError(
            f"{folder} holds files but no {META_FILE} or {PROGRESS_FILE} (not lit_cb's, or an interrupted write): "
            "move it away to generate the teacher text again"
        )
    return parts.read()  # also refuses an unfinished generation from other settings


def cached_teacher_text(
    cache_root: Path | str | None,
    fingerprint: dict,
    make: Callable[[dict[int, torch.Tensor], OnBatch | None], torch.Tensor],
    write: bool = True,
    shared: bool = False,
) -> torch.Tensor:
    """The teacher sequences for ``fingerprint``: read from ``cache_root/teacher_text`` when a cache
    with the same fingerprint is there, else made by ``make(finished, on_batch)`` and stored there
    (``write``). ``finished`` holds the batches an interrupted call already wrote (by batch index);
    ``make`` must use them and call ``on_batch(i, rows)`` for each batch it makes (``on_batch`` is
    None when nothing is written), so the next call resumes after the last finished batch.

    ``shared``: ``cache_root`` is a cache shared by runs (``data.teacher_cache_dir``); the folder is
    :func:`shared_cache_folder` (one per fingerprint), and a writing call holds an exclusive
    ``flock`` on its ``lock`` file from the first look to the final write, so processes asking for
    the same text at once generate it once: the others wait, then load it. A call that does not
    write (a DDP rank other than 0) reads under a shared lock (so it waits for a generation under
    way and then loads its result) and, when nothing is finished, generates the rest itself without
    the lock, as in a per-run cache.

    A cache or unfinished generation from other settings or another model is refused (the error
    lists what differs) rather than reused or overwritten; so is a folder holding tokens without
    ``meta.json`` or ``progress.json`` (files lit_cb did not write)."""
    if cache_root is None:
        return make({}, None)
    if shared:
        folder, hint = shared_cache_folder(cache_root, fingerprint), "or choose another data.teacher_cache_dir"
    else:
        folder, hint = Path(cache_root) / CACHE_DIR, "or choose another run_name or output_dir"
    parts = _Parts(folder, fingerprint, hint)
    if not write:
        if shared and folder.is_dir():
            with _locked(folder, fcntl.LOCK_SH):
                found = _read_cache(folder, fingerprint, parts, False, hint)
        else:
            found = _read_cache(folder, fingerprint, parts, False, hint)
        return found if isinstance(found, torch.Tensor) else make(found, None)
    if not shared:
        return _fill(folder, fingerprint, parts, make, hint)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder, fcntl.LOCK_EX):
        return _fill(folder, fingerprint, parts, make, hint)


def _fill(folder: Path, fingerprint: dict, parts: _Parts, make, hint: str) -> torch.Tensor:
    """Load the finished cache, or generate what is missing and write it (batch by batch, then the final files)."""
    found = _read_cache(folder, fingerprint, parts, True, hint)
    if isinstance(found, torch.Tensor):
        return found
    tokens = make(found, parts.start(found))
    write_tokens(folder / TOKENS_FILE, tokens)
    # meta.json last: its presence says the tokens are complete; then the parts can go.
    text = json.dumps({"fingerprint": fingerprint, "shape": list(tokens.shape)}, indent=1)
    atomic_write_text(folder / META_FILE, text)
    parts.remove()
    return tokens


def teacher_windows(
    model: torch.nn.Module,
    datamodule,
    model_identity,
    device: torch.device | str,
    cache_root: Path | str | None,
    dtype: torch.dtype | None = None,
    write: bool = True,
    progress: bool = True,
) -> torch.Tensor:
    """The run's teacher text as fine-tuning windows ``[n * teacher_seqlen / finetune_seqlen,
    finetune_seqlen]``, from the cache or generated (see the module docstring): sequences longer than
    a window are cut, shorter ones packed back to back in generation order (each still opens on its
    document-start token, as windows of joined C4 documents do after an EOS). ``cache_root`` is
    the run folder: the per-run cache's home, and with ``data.teacher_cache_dir`` the place of
    ``teacher_text.json`` (which shared tokens the run trains on; a resume refuses others)."""
    cfg = datamodule.config
    seqlen = cfg.teacher_sequence_length
    own = cfg.teacher_seed is not None
    seed = cfg.teacher_seed if own else cfg.seed + 5
    pool = "all" if own else "train"
    fingerprint = teacher_fingerprint(
        model_identity,
        cfg.num_teacher_samples,
        seqlen,
        cfg.teacher_temperature,
        cfg.teacher_top_p,
        cfg.teacher_batch_size,
        seed,
        dtype or next(model.parameters()).dtype,
    )
    shared = cfg.teacher_cache_dir is not None
    if own:
        fingerprint["first_token"] = "document-starts-all"
    starts = None
    if shared:
        # What the run fingerprint covers for a per-run cache (the fine-tuning source, the tokenizer,
        # the document split of data.seed) the shared folder's fingerprint must hold itself: the prompts.
        starts = datamodule.document_starts(cfg.num_teacher_samples, seed, pool)
        fingerprint["first_tokens_sha256"] = tensor_sha256(starts)

    def make(finished: dict[int, torch.Tensor], on_batch: OnBatch | None) -> torch.Tensor:
        prompts = starts if starts is not None else datamodule.document_starts(cfg.num_teacher_samples, seed, pool)
        return sample_sequences(
            model,
            prompts,
            seqlen,
            cfg.teacher_temperature,
            cfg.teacher_top_p,
            cfg.teacher_batch_size,
            seed,
            device,
            dtype,
            progress,
            finished,
            on_batch,
        )

    if not shared:
        tokens = cached_teacher_text(cache_root, fingerprint, make, write)
    else:
        tokens = cached_teacher_text(cfg.teacher_cache_dir, fingerprint, make, write, shared=True)
    if cache_root is not None and write:
        # Rank 0 only: another DDP rank that found nothing finished sampled its own copy (on a GPU not
        # bit-identical to rank 0's, as with a per-run cache), which is no resume on other text.
        where = shared_cache_folder(cfg.teacher_cache_dir, fingerprint) if shared else Path(cache_root) / CACHE_DIR
        _check_same_tokens(Path(cache_root), where, fingerprint, tokens, shared)
    return tokens.reshape(-1, cfg.finetune_seqlen)


def _check_same_tokens(run_dir: Path, folder: Path, fingerprint: dict, tokens: torch.Tensor, write: bool) -> None:
    """A run with a shared cache records the tokens it trains on in ``<run>/teacher_text.json`` (the
    folder and the sha256; ``write``). A resumed run that would now train on other tokens refuses,
    since its checkpoint was trained on the first ones: the shared cache was removed and generated
    again (GPU sampling is not bit-reproducible), or the run switched between a per-run cache
    (``<run>/teacher_text``) and a shared one. Nothing is recorded or checked for a run that only
    ever used its own cache (as before)."""
    sha = tensor_sha256(tokens)
    path, own = run_dir / RECORD_FILE, run_dir / CACHE_DIR
    before = None
    if path.is_file():
        before = _read_meta(path)
    elif folder != own and (own / META_FILE).is_file():  # an earlier start used the per-run cache
        stored = _load_tokens(own / TOKENS_FILE, own, list(tokens.shape))
        before = {"folder": str(own), "tokens_sha256": tensor_sha256(stored)}
    if before is not None and before.get("tokens_sha256") != sha:
        raise ValueError(
            f"the teacher text in {folder} (sha256 {sha[:12]}) is not the one this run started with "
            f"(in {before.get('folder')}, sha256 {str(before.get('tokens_sha256'))[:12]}): the cache was replaced "
            "or generated again, or data.teacher_cache_dir switched between null and a folder. Resuming would "
            "train the checkpoint on other text: put the original back, or start the run fresh (overwrite=true)"
        )
    record = {"folder": str(folder), "fingerprint": fingerprint, "tokens_sha256": sha}
    if write and (before is None or before != record):
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=1))
