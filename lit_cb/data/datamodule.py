"""One LightningDataModule for the three kinds of text a compression run needs.

* calibration: token windows that drive the Hessians and block fine-tuning (seeded; by default
  drawn the way GPTQ/AQLM draw C4 calibration data: a random document longer than the window,
  then a random window inside it);
* fine-tuning: windows for LoRA recovery, from documents disjoint from the validation ones;
* evaluation: the whole evaluation string tokenized once and cut into non-overlapping windows
  (the GPTQ/AQLM perplexity protocol).

Document files (``.jsonl``/``.json`` with a text field, or ``.txt``, optionally ``.xz``) are read
through ``datasets``; the evaluation string is read verbatim because the protocol depends on its
exact bytes.
"""

from __future__ import annotations

import random

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from lit_cb.configs.data import SAMPLING_MODES, DataConfig  # noqa: F401 (re-exported: the config lives torch-free)
from lit_cb.data.texts import read_eval_text, resolve_text


def load_documents(source: str, text_field: str = "text") -> list[str]:
    """Documents of a shipped or local text file, through ``datasets``."""
    path = resolve_text(source)
    import datasets

    name = path.name.removesuffix(".xz").removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    elif name.endswith(".txt"):
        ds = datasets.load_dataset("text", data_files=str(path), split="train", sample_by="paragraph")
    else:
        raise ValueError(f"cannot read documents from {path}: use .jsonl, .json or .txt (optionally .xz)")
    if text_field not in ds.column_names:
        raise ValueError(f"{path} has no field {text_field!r}; its fields: {ds.column_names}")
    return [t for t in ds[text_field] if t and t.strip()]


def sample_document_windows(docs_ids: list[list[int]], num_samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """GPTQ/AQLM C4 sampling: a random document with more than ``seqlen`` tokens, then one random
    window of it, ``num_samples`` times (documents may repeat). ``[num_samples, seqlen]``"""
    if not any(len(ids) > seqlen for ids in docs_ids):
        longest = max((len(ids) for ids in docs_ids), default=0)
        raise ValueError(
            f"no document has more than seqlen={seqlen} tokens (longest: {longest}); use "
            "calibration_sampling='concat' or a shorter calibration_seqlen"
        )
    rng = random.Random(seed)
    windows = []
    while len(windows) < num_samples:
        ids = docs_ids[rng.randint(0, len(docs_ids) - 1)]
        if len(ids) <= seqlen:
            continue
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.tensor(windows, dtype=torch.long)


def sample_concat_windows(
    docs_ids: list[list[int]], num_samples: int, seqlen: int, seed: int, separator: int | None
) -> torch.Tensor:
    """Random windows of the documents concatenated (with ``separator`` between them)."""
    stream: list[int] = []
    for ids in docs_ids:
        stream.extend(ids)
        if separator is not None:
            stream.append(separator)
    if len(stream) <= seqlen:
        raise ValueError(f"the documents hold {len(stream)} tokens, fewer than one window of {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - seqlen, (num_samples,), generator=gen)
    flat = torch.tensor(stream, dtype=torch.long)
    return torch.stack([flat[s : s + seqlen] for s in starts.tolist()])


def eval_windows(token_ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of one token stream, the tail dropped. ``[num_windows, seqlen]``"""
    n = token_ids.numel() // seqlen
    if n == 0:
        raise ValueError(f"the evaluation text has {token_ids.numel()} tokens, fewer than eval_seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return token_ids[: n * seqlen].view(n, seqlen)


class TokenWindows(Dataset):
    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i]}


class EpochShuffleSampler(Sampler[int]):
    """A shuffle whose order depends only on ``(seed, epoch)``, that can start mid-epoch.

    torch's RandomSampler draws its order from the global RNG when the iterator is created, so a
    run resumed from a checkpoint sees other batches than the uninterrupted run did (and restarts
    the epoch from its first batch). This order is a pure function of the seed and the epoch, and
    :meth:`resume` skips the samples already trained on. Under DDP each rank takes every
    ``world_size``-th index of the same order, padded to equal shares (Lightning's
    DistributedSampler is not used)."""

    def __init__(self, num_samples: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume(self, epoch: int, skip: int) -> None:
        """Start the next iteration at sample ``skip`` of epoch ``epoch``."""
        self.epoch, self._skip = epoch, skip

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=gen).tolist()
        # Equal shares (wrapping around, like DistributedSampler), so no rank waits for another.
        order = (order * self.world_size)[: len(self) * self.world_size][self.rank :: self.world_size]
        skip, self._skip = self._skip, 0
        return iter(order[skip:])

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)


class ResumableLoader(DataLoader):
    """The training loader, with the ``state_dict``/``load_state_dict`` pair Lightning saves in
    its checkpoints and restores on resume: the epoch and how many batches of it were trained
    (read from the trainer, since the loader runs one prefetched batch ahead of training)."""

    def __init__(self, dataset: Dataset, batch_size: int, sampler: EpochShuffleSampler, num_workers: int, trainer):
        # A private generator: creating an iterator then draws no number from the global RNG, so
        # the dropout RNG stream is the same with or without a resume.
        gen = torch.Generator().manual_seed(sampler.seed)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, generator=gen)
        self._trainer = trainer

    def state_dict(self) -> dict:
        done = self._trainer.fit_loop.epoch_loop.batch_progress.current.processed
        epoch = self._trainer.current_epoch
        if done >= len(self):  # saved at the end of an epoch: the next one starts from its first batch
            epoch, done = epoch + 1, 0
        return {"epoch": epoch, "batches": done}

    def load_state_dict(self, state: dict) -> None:
        self.sampler.resume(int(state["epoch"]), int(state["batches"]) * self.batch_size)


class CompressionDataModule(L.LightningDataModule):
    """Calibration windows for compression, train/val windows for recovery, test windows for
    the perplexity protocol. All tensors are built once in :meth:`setup` and are deterministic
    given ``config.seed``, so every rank of a multi-node run sees the same calibration set
    (each rank then takes its own shard, see :meth:`calibration_windows`)."""

    def __init__(self, tokenizer, config: DataConfig | None = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.config = config or DataConfig()
        self._calibration: torch.Tensor | None = None
        self._train: torch.Tensor | None = None
        self._val: torch.Tensor | None = None
        self._test: torch.Tensor | None = None
        self._docs_cache: dict[str, list[list[int]]] = {}

    # -- building ---------------------------------------------------------------------------------
    def _tokenized_docs(self, source: str) -> list[list[int]]:
        if source not in self._docs_cache:
            docs = load_documents(source, self.config.text_field)
            self._docs_cache[source] = self.tokenizer(docs, add_special_tokens=False)["input_ids"]
        return self._docs_cache[source]

    def calibration_windows(self, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """This rank's share of the calibration windows ``[n, calibration_seqlen]``."""
        if self._calibration is None:
            cfg = self.config
            docs = self._tokenized_docs(cfg.calibration_source)
            if cfg.calibration_sampling == "document":
                self._calibration = sample_document_windows(
                    docs, cfg.num_calibration_samples, cfg.calibration_seqlen, cfg.seed
                )
            else:
                self._calibration = sample_concat_windows(
                    docs, cfg.num_calibration_samples, cfg.calibration_seqlen, cfg.seed, self.tokenizer.eos_token_id
                )
        return self._calibration[rank::world_size]

    def _finetune_docs(self) -> tuple[list[list[int]], list[list[int]]]:
        """(training documents, validation documents) of the fine-tuning source, disjoint."""
        cfg = self.config
        docs = self._tokenized_docs(cfg.finetune_source)
        order = list(range(len(docs)))
        random.Random(cfg.seed + 1).shuffle(order)
        n_val = max(1, int(len(docs) * cfg.val_fraction_docs))
        return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]

    def document_starts(self, num: int, seed: int, pool: str = "train") -> torch.Tensor:
        """``[num]`` first tokens of seeded random fine-tuning documents: the prompts of the teacher
        text (:mod:`lit_cb.data.teacher_text`). ``pool="train"``: never validation ones (the split
        depends on ``data.seed``); ``"all"``: any fine-tuning document, the same for every data seed
        (``data.teacher_seed``: a teacher sample shared by runs of other data seeds)."""
        if pool not in ("train", "all"):
            raise ValueError(f"document_starts: pool={pool!r}; allowed: ['train', 'all']")
        docs = self._finetune_docs()[0] if pool == "train" else self._tokenized_docs(self.config.finetune_source)
        starts = [ids[0] for ids in docs if ids]
        gen = torch.Generator().manual_seed(seed)
        return torch.tensor(starts, dtype=torch.long)[torch.randint(0, len(starts), (num,), generator=gen)]

    def add_finetune_windows(self, windows: torch.Tensor) -> None:
        """Append ``[n, finetune_seqlen]`` windows (teacher text) to the recovery training set; the
        resumable sampler shuffles them with the C4 windows."""
        if self._train is None:
            self.setup("fit")
        if windows.ndim != 2 or windows.shape[1] != self._train.shape[1]:
            raise ValueError(f"windows of shape {list(windows.shape)} do not match [n, {self._train.shape[1]}]")
        self._train = torch.cat([self._train, windows.to(self._train.dtype)])

    def _finetune_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        train_docs, val_docs = self._finetune_docs()
        eos = self.tokenizer.eos_token_id
        train = sample_concat_windows(train_docs, cfg.num_finetune_samples, cfg.finetune_seqlen, cfg.seed + 2, eos)
        val = sample_concat_windows(val_docs, max(cfg.num_val_samples, 1), cfg.finetune_seqlen, cfg.seed + 3, eos)
        return train, val[: cfg.num_val_samples]

    def test_windows(self) -> torch.Tensor:
        """Evaluation windows ``[num_windows, eval_seqlen]`` of the whole evaluation text."""
        if self._test is None:
            text = read_eval_text(self.config.eval_source)
            ids = self.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
            self._test = eval_windows(ids, self.config.eval_seqlen, self.config.max_eval_windows)
        return self._test

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self._train is None:
            self._train, self._val = self._finetune_split()
        if stage in (None, "test"):
            self.test_windows()

    # -- loaders ------------------------------------------------------------------------------------
    def _loader(self, windows: torch.Tensor, batch_size: int, shuffle: bool) -> DataLoader:
        # A private generator so that iterating draws nothing from the global RNG (see ResumableLoader).
        return DataLoader(
            TokenWindows(windows),
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.config.num_workers,
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochShuffleSampler(self._train.shape[0], self.config.seed + 4, rank, world)
        return ResumableLoader(
            TokenWindows(self._train), self.config.batch_size, sampler, self.config.num_workers, trainer
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._val, self.config.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_windows(), self.config.eval_batch_size, shuffle=False)

    def calibration_dataloader(self, rank: int = 0, world_size: int = 1) -> DataLoader:
        return self._loader(self.calibration_windows(rank, world_size), self.config.batch_size, shuffle=False)
