"""Shared fixtures: a tiny random Llama and a tiny real tokenizer built from the shipped C4 text."""

from __future__ import annotations

import os

# Triton reads this when it is imported, and transformers/bitsandbytes may import it early: set it
# before anything else so the kernel tests run under the CPU interpreter whatever the test order.
os.environ.setdefault("TRITON_INTERPRET", "1")

import collections  # noqa: E402
import json
import lzma

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_deterministic_mode():
    """lit_cb.pipeline.run turns on deterministic kernels process-wide; keep tests independent."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def tiny_llama(num_layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 512, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.eval()
    return model


class TokenWindows(torch.utils.data.Dataset):
    """Rows of a ``[N, T]`` id tensor as ``{"input_ids": row}`` items: what recovery's training step reads."""

    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i]}


@pytest.fixture
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer over the 500 commonest words of the shipped C4 sample."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lit_cb.data.texts import embedded_text_path

    counts: collections.Counter = collections.Counter()
    with lzma.open(embedded_text_path("c4"), "rt", encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= 200:
                break
            counts.update(json.loads(line)["text"].lower().split())
    vocab = {"<unk>": 0, "<eos>": 1}
    for word, _ in counts.most_common(510):
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")


# Pipeline settings that make a whole compress + recover run of `tiny_llama` take seconds on a CPU
# (shared by the run-level tests; each adds what it varies).
TINY_RUN = {
    "run_name": "tiny",
    "data.num_calibration_samples": 4,
    "data.calibration_seqlen": 32,
    "data.num_finetune_samples": 32,
    "data.finetune_seqlen": 32,
    "data.num_val_samples": 2,
    "data.eval_seqlen": 64,
    "data.max_eval_windows": 2,
    "data.batch_size": 4,
    "compression.method": "codebook",
    "compression.method_config": "{in_group_size: 4, nbits: 4, kmeans_iters: 2}",
    "compression.forward_batch_size": 4,
    "recovery.lr": 0.01,
    "recovery.warmup_steps": 2,
    "recovery.lora_r": 4,
    "recovery.lora_on_compressed": True,
    "trainer.accelerator": "cpu",
    "trainer.log_every_n_steps": 1,
    "eval.float_model": False,
    "eval.compressed": False,
}


def interpreted_module(name: str, kernel: str):
    """The kernel module ``name`` with its Triton kernels run by the CPU interpreter. A module imported before
    ``TRITON_INTERPRET`` was set holds compiled-mode kernels (``kernel`` is then no ``InterpretedFunction``), so it
    is reloaded in place; anything else than ``TRITON_INTERPRET=1`` fails the calling module, never skips it."""
    import importlib

    import triton  # noqa: F401  (a missing Triton fails the module)
    from triton.runtime.interpreter import InterpretedFunction

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("TRITON_INTERPRET is set to something other than 1: the kernel tests need the interpreter")
    module = importlib.import_module(name)
    if not isinstance(getattr(module, kernel), InterpretedFunction):
        module = importlib.reload(module)
    return module


def load_script(relative_path: str):
    """A script of the repository (``bench/x.py``, ``scripts/x.py``: folders that are no packages) as a
    module, loaded by path so its functions can be tested."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny_model(folder, tokenizer, num_layers: int = 2):
    """The tiny Llama with ``tokenizer``'s vocabulary, saved with it as a model folder (``model.name``)."""
    model = tiny_llama(num_layers=num_layers, vocab=len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_script_setup(tmp_path, tokenizer, **overrides) -> tuple:
    """For tests that run bench/ scripts or ``lit_cb`` as processes on the tiny model: the model folder, a config
    file of ``TINY_RUN`` plus ``overrides`` (dotted keys), and an environment whose PATH starts with this
    interpreter's folder (the scripts call ``python3``). Returns ``(model_dir, config_path, env)``."""
    import sys
    from pathlib import Path

    from lit_cb.config import load_config, save_config

    model_dir = save_tiny_model(tmp_path / "model", tokenizer)
    config = tmp_path / "tiny.yaml"
    save_config(load_config(None, [f"{k}={v}" for k, v in {**TINY_RUN, **overrides}.items()]), config)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return model_dir, config, env


def resume_equals(cfg, reference: dict) -> None:
    """Resume the crashed run of ``cfg`` from its ``last.ckpt`` and check that it saves exactly the
    tensors of the uninterrupted run (``reference``, its model.safetensors)."""
    from safetensors.torch import load_file

    from lit_cb.pipeline import run

    metrics = run(cfg)
    assert metrics["stages"]["recover"]["resumed_from"].endswith("last.ckpt")
    resumed = load_file(str(cfg.run_dir / "model" / "model.safetensors"))
    assert reference.keys() == resumed.keys()
    worst = max((reference[k].float() - resumed[k].float()).abs().max().item() for k in reference)
    assert worst == 0.0, f"resumed run differs from the uninterrupted one by up to {worst}"
