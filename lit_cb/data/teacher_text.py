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
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lit_cb.integrity import atomic_write_text

CACHE_DIR = "teacher_text"
TOKENS_FILE = "tokens.safetensors"
META_FILE = "meta.json"


def teacher_fingerprint(
    model_identity, num_samples: int, seqlen: int, temperature: float, top_p: float, batch_size: int, seed: int, dtype
) -> dict:
    """What the cached sequences depend on (batch size and dtype too: they change the GPU numerics
    and the order of the random draws)."""
    return {
        "model": model_identity,
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
) -> torch.Tensor:
    """``[len(first_tokens), seqlen]`` token ids: each row starts with its first token and continues
    with ``seqlen - 1`` tokens sampled from ``model`` (no stop at EOS). ``model`` is not changed:
    generation runs on a copy on ``device`` in ``dtype`` (default: the model's)."""
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
        return _sample(worker, first_tokens, seqlen, temperature, top_p, batch_size, seed, device, progress)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        del worker
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the KV cache and the fp16 copy: give them back before compression


def _sample(worker, first_tokens, seqlen, temperature, top_p, batch_size, seed, device, progress) -> torch.Tensor:
    from tqdm.auto import tqdm

    from lit_cb.generate import generate

    rows: list[torch.Tensor] = []
    n = first_tokens.shape[0]
    bar = tqdm(total=n * seqlen, desc="teacher text", unit="tok", unit_scale=True, disable=not progress)
    for i, start in enumerate(range(0, n, batch_size)):
        prompt = first_tokens[start : start + batch_size].view(-1, 1).to(device)
        if seqlen > 1:
            new, _ = generate(
                worker,
                None,
                prompt,
                max_new_tokens=seqlen - 1,
                temperature=temperature,
                top_p=top_p,
                seed=seed * 1_000_003 + i,
                compile_backend="graph",
                warn=lambda message: bar.write(message),
            )
            rows.append(torch.cat([prompt, new], dim=1).cpu())
        else:
            rows.append(prompt.cpu())
        bar.update(prompt.shape[0] * seqlen)
    bar.close()
    return torch.cat(rows).to(torch.long)


def _read_meta(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(
            f"{path} is corrupt ({err}); move {path.parent} away to generate the teacher text again"
        ) from err


def cached_teacher_text(cache_root: Path | str | None, fingerprint: dict, make, write: bool = True) -> torch.Tensor:
    """The teacher sequences for ``fingerprint``: read from ``cache_root/teacher_text`` when a cache
    with the same fingerprint is there, else made by ``make()`` and stored there (``write``).

    A cache from other settings or another model is refused (the error lists what differs) rather
    than reused or overwritten; so is a folder holding tokens without ``meta.json`` (an interrupted
    write, or files lit_cb did not write)."""
    if cache_root is None:
        return make()
    folder = Path(cache_root) / CACHE_DIR
    meta_path, tokens_path = folder / META_FILE, folder / TOKENS_FILE
    if meta_path.is_file():
        stored = _read_meta(meta_path).get("fingerprint", {})
        if stored != fingerprint:
            changed = sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k))
            lines = [f"{k}: {stored.get(k, '<absent>')!r} -> {fingerprint.get(k, '<absent>')!r}" for k in changed]
            raise ValueError(
                f"the teacher text cached in {folder} was made with other settings ({'; '.join(lines)}). It is not "
                "reused and not overwritten: move that folder away to generate it again, or choose another run_name "
                "or output_dir"
            )
        try:
            tokens = load_file(str(tokens_path))["input_ids"]
        except Exception as err:  # noqa: BLE001  any unreadable file: say which and how to recover
            raise ValueError(
                f"{tokens_path} is missing or corrupt ({err}); move {folder} away to generate the teacher text again"
            ) from err
        expected = [fingerprint["num_samples"], fingerprint["seqlen"]]
        if list(tokens.shape) != expected:
            raise ValueError(f"{tokens_path} holds shape {list(tokens.shape)}, its meta.json says {expected}")
        return tokens.to(torch.long)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(
            f"{folder} holds files but no {META_FILE} (an interrupted write, or not lit_cb's): move it away to "
            "generate the teacher text again"
        )
    tokens = make()
    if write:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (TOKENS_FILE + ".tmp")
        save_file({"input_ids": tokens.contiguous()}, str(tmp))
        tmp.replace(tokens_path)
        # meta.json last: its presence says the tokens are complete.
        atomic_write_text(meta_path, json.dumps({"fingerprint": fingerprint, "shape": list(tokens.shape)}, indent=1))
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
    finetune_seqlen]``, from the cache in ``cache_root`` or generated (see the module docstring)."""
    cfg = datamodule.config
    seqlen = cfg.teacher_sequence_length
    seed = cfg.seed + 5
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

    def make() -> torch.Tensor:
        starts = datamodule.document_starts(cfg.num_teacher_samples, seed)
        return sample_sequences(
            model,
            starts,
            seqlen,
            cfg.teacher_temperature,
            cfg.teacher_top_p,
            cfg.teacher_batch_size,
            seed,
            device,
            dtype,
            progress,
        )

    tokens = cached_teacher_text(cache_root, fingerprint, make, write)
    return tokens.reshape(-1, cfg.finetune_seqlen)
