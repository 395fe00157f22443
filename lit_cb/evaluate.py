"""Perplexity by the GPTQ/AQLM protocol: the mean token negative log-likelihood over
non-overlapping windows of the whole evaluation text, exponentiated."""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.text import Perplexity
from tqdm.auto import tqdm


def causal_lm_perplexity_update(metric: Perplexity, logits: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Feed one batch to a torchmetrics ``Perplexity``: token t predicts token t+1."""
    metric.update(logits[:, :-1].float(), input_ids[:, 1:])


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """Perplexity of ``model`` over ``windows`` ``[num_windows, seqlen]``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # Every caller passes all the windows, on one rank (rank 0 after training) or on each: never
    # sync with other ranks, which may not be evaluating at all.
    metric = Perplexity(sync_on_compute=False).to(device)
    was_training = model.training
    model.eval()
    starts = range(0, windows.shape[0], batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        causal_lm_perplexity_update(metric, logits, batch)
    model.train(was_training)
    return float(metric.compute())


def load_for_evaluation(name: str, device: torch.device) -> tuple[nn.Module, object, dict]:
    """``(model, tokenizer, meta)`` for whatever ``lit_cb evaluate`` is pointed at, so every model is
    measured by one protocol: a lit_cb folder (or the run folder holding it; ``meta`` is its
    compression.json), an AQLM folder (imported into lit_cb's layers, its ``lora/`` adapter merged), any
    other Hugging Face causal-LM folder transformers loads (float or quantized by its own method), or an
    embedded model's name (float). ``meta`` is empty for all but lit_cb folders."""
    from pathlib import Path

    from lit_cb.hf_quantizer import QUANT_METHOD
    from lit_cb.interop.aqlm import import_aqlm, is_aqlm_dir
    from lit_cb.models import EMBEDDED_MODELS, load_model
    from lit_cb.serialization import RUN_INFO, load_compressed, model_folder, read_quantization_config

    if name in EMBEDDED_MODELS:
        model, tokenizer = load_model(name, "float32", device)
        return model, tokenizer, {}
    folder = model_folder(Path(name).expanduser())
    qc = read_quantization_config(folder)  # clear errors for a missing folder or config.json
    if is_aqlm_dir(folder):
        model, tokenizer = import_aqlm(folder)
        return model.to(device), tokenizer, {}
    lit_cb_folder = (qc or {}).get("quant_method") == QUANT_METHOD or (qc is None and (folder / RUN_INFO).is_file())
    if lit_cb_folder:
        return load_compressed(folder, device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32 if qc is None else "auto")
    return model.to(device).eval(), AutoTokenizer.from_pretrained(folder), {}


def evaluate_saved(cfg) -> dict:
    """``lit_cb evaluate``: the perplexity of a saved model (see :func:`load_for_evaluation` for what
    it may be), under the saving run's protocol for a lit_cb folder unless ``cfg`` (an
    :class:`lit_cb.configs.evaluate.EvaluateConfig`) says otherwise; returns (and optionally writes)
    ``{"model_dir", "protocol", "perplexity", "stored_ppl", "seconds"}``."""
    import contextlib
    import json
    import time
    from pathlib import Path

    from lit_cb.configs.data import DataConfig
    from lit_cb.data.datamodule import CompressionDataModule
    from lit_cb.models import EMBEDDED_MODELS
    from lit_cb.serialization import model_folder

    model_dir = cfg.model_dir if cfg.model_dir in EMBEDDED_MODELS else model_folder(cfg.model_dir)
    if cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("accelerator asks for a GPU but torch sees none")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    t = time.perf_counter()
    model, tokenizer, meta = load_for_evaluation(str(model_dir), device)
    if tokenizer is None:
        raise FileNotFoundError(f"{model_dir} holds no tokenizer: it cannot be evaluated on text")
    saved = (meta.get("run_config") or {}).get("data", {})
    max_windows = saved.get("max_eval_windows") if cfg.max_eval_windows is None else cfg.max_eval_windows
    protocol = {
        "eval_source": cfg.eval_source or saved.get("eval_source", "wikitext2"),
        "eval_seqlen": cfg.eval_seqlen or saved.get("eval_seqlen", 2048),
        "max_eval_windows": max_windows or None,
    }
    windows = CompressionDataModule(tokenizer, DataConfig(**protocol)).test_windows()
    dtype = getattr(torch, cfg.autocast_dtype) if cfg.autocast_dtype else None
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with ctx:
        ppl = perplexity(model, windows, cfg.batch_size, device, desc="perplexity")
    result = {
        "model_dir": str(model_dir),
        "protocol": {**protocol, "num_windows": int(windows.shape[0])},
        "perplexity": ppl,
        "stored_ppl": meta.get("wikitext2_ppl", {}),
        "seconds": time.perf_counter() - t,
    }
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(result, indent=1))
    return result
