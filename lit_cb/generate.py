"""``lit_cb generate``: stream text from a lit_cb model, a plain Hugging Face folder or ``smollm2``.

    lit_cb generate outputs/smollm2_codebook/model --prompt "What is a codebook?" --max-new-tokens 128
    lit_cb generate smollm2 --prompt "Once upon a time" --temperature 0.7 --top-p 0.9 --seed 1

The prompt goes through the tokenizer's chat template when it has one (``--no-chat-template`` turns that
off), the reply streams to stdout, and prefill and decode tokens/s go to stderr at the end. Greedy by
default; ``--temperature > 0`` samples (with ``--top-p`` and ``--seed``).

On a GPU the default (``--compile graph``) is lit_cb's own decode loop: a transformers ``StaticCache``,
one eager forward for the prompt, then one decode step (write the mask bit, forward one token per row,
advance the position) captured once in a ``torch.cuda.CUDAGraph`` and replayed per token; only the
token choice (argmax or seeded top-p sampling, with no host sync: see ``_pick``) and the end-of-sequence
check run outside the graph.
That removes the per-token Python and launch overhead which bounds transformers' ``generate`` at small
batches. If the capture fails the command says why and runs the same loop eagerly. Batch rows must be
prompts of equal length (no left padding): every prompt token is attended to. ``cudagraphs`` and
``inductor`` keep the older path: transformers' ``generate`` with a static cache under a fullgraph
``torch.compile`` of that backend. On a CPU the model runs eagerly (transformers' ``generate``),
compressed layers through their PyTorch reference.

Only :func:`main` is the command; :func:`load`, :func:`encode_prompt` and :func:`generate` are the
pieces it is made of, for scripts (``bench/generate.py``) and tests.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load after argument parsing, so --help stays fast
    import torch

WARMUP_TOKENS = 3
GRAPH_WARMUP_STEPS = 2  # eager decode steps (on a side stream) before the capture: Triton/cuBLAS set-up
COMPILE_BACKENDS = ("graph", "inductor", "cudagraphs")
TORCH_COMPILE_BACKENDS = ("inductor", "cudagraphs")  # the ones that go through transformers' generate
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class GenerationStats:
    """Token counts and wall-clock seconds of one generation (batch rows counted together)."""

    prompt_tokens: int
    decode_tokens: int
    prefill_seconds: float
    decode_seconds: float
    compile_backend: str | None

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tok_s(self) -> float:
        """Tokens after the first one (which the prefill produced) per second of decoding."""
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    def summary(self) -> str:
        modes = {
            None: "eager",
            "graph": "static cache, one CUDA graph replay per token",
            "graph-eager": "static cache loop, eager",
        }
        mode = modes.get(self.compile_backend, f"static cache + torch.compile ({self.compile_backend})")
        return (
            f"prefill: {self.prompt_tokens} tokens in {self.prefill_seconds:.3f} s ({self.prefill_tok_s:.1f} tok/s); "
            f"decode: {self.decode_tokens} tokens in {self.decode_seconds:.3f} s ({self.decode_tok_s:.1f} tok/s) "
            f"[{mode}]"
        )


def _decoding() -> contextlib.ExitStack:
    """Inference mode, with trellis layers that read one input (q/k/v, gate/up) sharing its rotation
    (:func:`lit_cb.trellis.shared_rotations`; nothing changes a layer's input in place while decoding)."""
    import torch

    from lit_cb.trellis import shared_rotations

    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode())
    stack.enter_context(shared_rotations())
    return stack


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _top_p(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lit_cb generate",
        description="Generate text with a lit_cb compressed model, a plain Hugging Face model folder or 'smollm2'.",
    )
    p.add_argument("model", help="model folder (lit_cb output or plain Hugging Face), or the embedded name 'smollm2'")
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --no-chat-template)")
    add_decoding_arguments(p, max_new_tokens=128)
    p.add_argument("--no-chat-template", action="store_true", help="tokenize the prompt as raw text")
    p.add_argument("--no-stream", action="store_true", help="print the reply at the end instead of streaming it")
    return p


def add_decoding_arguments(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """The options ``generate`` and ``chat`` share: how many tokens, how they are picked, and where and
    how the model runs (read back by :func:`prepare`)."""
    p.add_argument("--max-new-tokens", type=_positive_int, default=max_new_tokens)
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=_top_p, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument(
        "--dtype", choices=DTYPE_NAMES, default="auto", help="activations/float weights; auto = float16 on GPU"
    )
    p.add_argument(
        "--compile",
        choices=("auto", "off", *COMPILE_BACKENDS),
        default="auto",
        help="graph: lit_cb's static-cache loop replaying one captured CUDA graph per token (GPU); cudagraphs / "
        "inductor: transformers' generate with a static cache under a fullgraph torch.compile of that backend "
        "(inductor compiles for about a minute); auto = graph on a GPU, off on a CPU",
    )
    p.add_argument(
        "--fuse",
        choices=("auto", "on", "off"),
        default="auto",
        help="run q/k/v and gate/up CodebookLinears as one fused layer each (one kernel launch); auto = on a GPU "
        "unless --compile is inductor/cudagraphs",
    )


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name} asks for a GPU but torch sees none; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: lit_cb generate runs on cpu or cuda")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load(model: str, device: torch.device, dtype: torch.dtype):
    """``(model, tokenizer)`` for a model folder (lit_cb or plain, any quant_method transformers
    knows; a peft adapter in its ``lora/``, as an AQLM export of a LoRA-recovered model has, put on)
    or an embedded name; the model in eval mode on ``device``."""
    from lit_cb.models import EMBEDDED_MODELS

    if model in EMBEDDED_MODELS:
        from lit_cb.models import load_model

        return load_model(model, str(dtype).removeprefix("torch."), device)
    from lit_cb.serialization import model_folder, read_quantization_config

    path = model_folder(Path(model).expanduser())  # a run folder stands for its model/
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {model!r}: no such folder; give a model folder (a lit_cb output's model/ or a Hugging Face "
            f"folder) or one of the embedded models {sorted(EMBEDDED_MODELS)}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lit_cb  # noqa: F401  registers quant_method lit_cb with transformers

    read_quantization_config(path)  # clear errors for a missing or unreadable config.json
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer (tokenizer_config.json / tokenizer.json)")
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device))
    tokenizer = AutoTokenizer.from_pretrained(path)
    from lit_cb.lora import ADAPTER_SUBDIR, is_adapter_dir, with_adapter

    if is_adapter_dir(path / ADAPTER_SUBDIR):  # an AQLM export's low-rank slots (lit_cb export --format aqlm)
        loaded = with_adapter(loaded, path / ADAPTER_SUBDIR)
    return loaded.eval(), tokenizer


def encode_prompt(tokenizer, prompt: str, chat_template: bool = True) -> torch.Tensor:
    """``[1, T]`` input ids: the chat template with a generation prompt when the tokenizer has one
    (and ``chat_template``), else the raw text."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    ids = enc["input_ids"]
    if ids.shape[-1] == 0:
        raise ValueError("the prompt encodes to no tokens; give a non-empty --prompt")
    return ids


class _Clock:
    """Streamer hook: the time of each ``put`` (the prompt first, then each new token), so prefill and
    decode can be told apart without a second run."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def tick(self, value) -> None:
        # generate hands the streamer CPU copies of the tokens, so the GPU work before them has finished
        self.times.append(time.perf_counter())


def _streamer(tokenizer, clock: _Clock, stream: bool):
    from transformers.generation.streamers import BaseStreamer, TextStreamer

    if stream:

        class TimedTextStreamer(TextStreamer):
            def put(self, value):
                clock.tick(value)
                super().put(value)

        return TimedTextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

    class TimedStreamer(BaseStreamer):
        def put(self, value):
            clock.tick(value)

        def end(self):
            pass

    return TimedStreamer()


class _StopAfter:
    """A stopping criterion for the compile warm-up: ``n`` new tokens, then stop (the generation keeps the
    real ``max_new_tokens``, so the static cache it sizes is the one the real run reuses)."""

    def __init__(self, prompt_len: int, n: int) -> None:
        self.limit = prompt_len + n

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.limit, device=input_ids.device)


def generation_config(
    model, max_new_tokens: int, temperature: float, top_p: float, compile_backend: str | None, tokenizer
):
    """The model's generation config with the command's decoding choices (greedy when temperature is 0)
    and, with a ``compile_backend``, a static KV cache whose decode step transformers compiles."""
    import copy

    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    cfg = copy.deepcopy(base) if base is not None else GenerationConfig()
    cfg.max_new_tokens = max_new_tokens
    cfg.max_length = None
    cfg.min_new_tokens = None
    cfg.do_sample = temperature > 0
    cfg.temperature = temperature if temperature > 0 else None
    cfg.top_p = top_p if temperature > 0 else None
    cfg.top_k = 0 if temperature > 0 else None  # 0: no top-k (None would mean transformers' default, 50)
    if cfg.pad_token_id is None and tokenizer is not None:
        cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if compile_backend is not None:
        from transformers.generation.configuration_utils import CompileConfig

        if compile_backend not in TORCH_COMPILE_BACKENDS:
            raise ValueError(f"compile backend {compile_backend!r}; allowed: {TORCH_COMPILE_BACKENDS}")
        cfg.cache_implementation = "static"
        # fullgraph: a graph break is an error (caught by generate's warm-up), not a silent slowdown.
        # "reduce-overhead" is inductor's CUDA-graph mode; the cudagraphs backend takes no mode.
        mode = "reduce-overhead" if compile_backend == "inductor" else None
        cfg.compile_config = CompileConfig(fullgraph=True, backend=compile_backend, mode=mode)
        cfg.compile_config._compile_all_devices = model.device.type != "cuda"  # on a CPU only when asked for
        cfg.disable_compile = False
    else:
        cfg.cache_implementation = None
        cfg.disable_compile = True
    return cfg


def _static_cache(model, batch: int, max_cache_len: int):
    """A transformers ``StaticCache`` of ``max_cache_len`` positions. transformers 5.x takes the config and
    the length and allocates lazily on the first update (the prefill); older releases wanted the batch,
    device and dtype up front."""
    from transformers import StaticCache

    try:
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    except TypeError:
        return StaticCache(
            config=model.config,
            max_batch_size=batch,
            max_cache_len=max_cache_len,
            device=model.device,
            dtype=model.dtype,
        )


def _cache_keyword(model) -> str:
    """The forward argument that takes the cache: ``cache`` from transformers 5.2x, ``past_key_values`` before
    (5.2x still accepts the old name, with a deprecation warning)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _DecodeStep:
    """One decode step on static tensors: mark position ``pos`` as attended, run the model on the ``[B, 1]``
    tokens in ``ids`` at that position (the static cache writes its key/value there), advance ``pos`` and
    return the last logits. Every input is a tensor updated in place, so the same call can be captured in
    a CUDA graph and replayed; nothing in it reads a value back to the CPU."""

    def __init__(self, model, cache, cache_kw: str, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor):
        self.model, self.cache, self.cache_kw = model, cache, cache_kw
        self.ids, self.pos, self.mask = ids, pos, mask

    def __call__(self) -> torch.Tensor:
        self.mask.index_fill_(1, self.pos, 1)
        out = self.model(
            input_ids=self.ids,
            attention_mask=self.mask,
            position_ids=self.pos.view(1, 1).expand(self.ids.shape[0], 1),
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kw: self.cache},
        )
        self.pos.add_(1)
        return out.logits[:, -1, :]


def _snapshot(objects) -> list:
    """The small state of ``objects`` (position counters, the mask; not the big key/value tensors), so the
    warm-up steps before a capture can be undone."""
    import torch

    saved = []
    for obj in objects:
        for name, value in vars(obj).items():
            if name in ("keys", "values"):
                continue
            if isinstance(value, torch.Tensor):
                saved.append((obj, name, value, value.clone()))
            elif isinstance(value, (bool, int, float)):
                saved.append((obj, name, None, value))
    return saved


def _restore(saved: list) -> None:
    for obj, name, tensor, value in saved:
        if tensor is not None:
            tensor.copy_(value)
        else:
            setattr(obj, name, value)


def _capture(step: _DecodeStep, device: torch.device):
    """``(graph, logits)``: ``step`` captured in a CUDA graph whose replay refills ``logits``. A few eager
    steps on a side stream first compile/autotune the Triton kernels and set up cuBLAS outside the capture
    (as bench/decode_7b.py does); their effect on the cache counters, position and mask is then undone
    (the keys/values they wrote sit at positions the real steps overwrite before attending to them)."""
    import torch

    saved = _snapshot([step, step.cache, *getattr(step.cache, "layers", [])])
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                step()
        torch.cuda.current_stream().wait_stream(side)
        _restore(saved)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                logits = step()
        finally:
            _restore(saved)  # capturing runs no kernels, but Python-side state may have moved
        torch.cuda.synchronize()
    return graph, logits


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, order)``: the temperature-scaled probabilities sorted in descending order, those outside
    the nucleus set to 0, and the vocabulary index of each sorted position. The nucleus is transformers'
    top-p rule: a token is dropped when the mass of the tokens before it already exceeds ``top_p``."""
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=-1)
    kept, order = probs.sort(dim=-1, descending=True)
    drop = kept.cumsum(-1) - kept > top_p  # the mass before a token already reaches top_p
    return kept.masked_fill_(drop, 0), order


def _race(probs: torch.Tensor, generator) -> torch.Tensor:
    """Index of a draw from the (unnormalised) ``probs`` along the last dim: ``argmax(p / E)`` with
    ``E ~ Exp(1)`` i.i.d. wins at ``i`` with probability ``p_i / sum(p)`` (``E_i / p_i`` is exponential
    with rate ``p_i``; the smallest of independent exponentials is ``i`` with that probability).

    It is the computation ``torch.multinomial(probs, 1)`` does for one sample, same generator calls on
    the same shape, so the same draw bit for bit, but without multinomial's two input checks that read
    values back to the host (``.item()``): those stall the decode loop on every token, and the loop can
    otherwise queue the next graph replay while the GPU is still sampling."""
    import torch

    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return torch.div(probs, race, out=race).argmax(-1)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """``[B]`` next tokens: argmax when ``temperature`` is 0, else a draw from the temperature-scaled
    distribution cut to the smallest top set of mass >= ``top_p`` (transformers' top-p rule).

    With ``top_p < 1`` the draw runs on the sorted probabilities (:func:`_nucleus`) and the winning
    position is mapped back through the sort order: no scatter back to vocabulary order. Distribution
    and seeding are those of a draw over the vocabulary, but the random numbers land on sorted positions,
    so a given seed picks other tokens than lit_cb's earlier scatter + multinomial sampler did. No step
    reads a value back to the host (see :func:`_race`)."""
    if temperature <= 0:
        return logits.argmax(-1)
    if top_p < 1:
        kept, order = _nucleus(logits, temperature, top_p)
        return order.gather(-1, _race(kept, generator).unsqueeze(-1)).squeeze(-1)
    import torch

    return _race(torch.softmax(logits.float() / temperature, dim=-1), generator)


def _graph_generate(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    stream: bool,
    capture: bool,
    warn,
) -> tuple[torch.Tensor, GenerationStats]:
    """lit_cb's decode loop (see the module docstring); ``capture=False`` (or a CPU) runs the very same
    steps eagerly. Rows of ``input_ids`` are equal-length prompts, all tokens attended to."""
    import torch

    device = input_ids.device
    batch, prompt_len = input_ids.shape
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    pad = getattr(gen_cfg, "pad_token_id", None)
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = pad if pad is not None else (eos_ids[0] if eos_ids else 0)
    eos_t = torch.tensor(eos_ids, device=device, dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed)
    printer = _streamer(tokenizer, _Clock(), True) if stream else None
    capture = capture and device.type == "cuda"

    # room for the warm-up steps, whose key/value writes land past the last real position
    cache_len = prompt_len + max_new_tokens + GRAPH_WARMUP_STEPS
    with _decoding():
        cache = _static_cache(model, batch, cache_len)
        cache_kw = _cache_keyword(model)
        mask = torch.zeros(batch, cache_len, dtype=torch.long, device=device)
        mask[:, :prompt_len] = 1
        if printer is not None:
            printer.put(input_ids.cpu())
        start = time.perf_counter()
        out = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=torch.arange(prompt_len, device=device).unsqueeze(0).expand(batch, -1),
            use_cache=True,
            logits_to_keep=1,
            **{cache_kw: cache},
        )
        token = _pick(out.logits[:, -1, :], temperature, top_p, generator)
        del out
        unfinished = ~torch.isin(token, eos_t)
        tokens = [token]
        first = token.cpu()  # waits for the prefill
        prefill_seconds = time.perf_counter() - start
        if printer is not None:
            printer.put(first)

        ids = token.unsqueeze(1).clone()
        pos = torch.tensor([prompt_len], dtype=torch.long, device=device)
        step = _DecodeStep(model, cache, cache_kw, ids, pos, mask)
        graph, logits = None, None
        backend = "graph-eager"
        if capture and max_new_tokens > 1 and bool(unfinished.any()):
            try:
                graph, logits = _capture(step, device)
                backend = "graph"
            except Exception as err:  # noqa: BLE001  any capture failure: say it and run the loop eagerly
                warn(f"CUDA graph capture of the decode step failed, decoding eagerly: {type(err).__name__}: {err}")
                graph = None
        start = time.perf_counter()
        for _ in range(max_new_tokens - 1):
            if eos_ids and not bool(unfinished.any()):
                break
            if graph is not None:
                graph.replay()
            else:
                logits = step()
            token = _pick(logits, temperature, top_p, generator)
            if eos_ids:
                token = torch.where(unfinished, token, torch.full_like(token, pad))
                unfinished &= ~torch.isin(token, eos_t)
            tokens.append(token)
            ids.copy_(token.unsqueeze(1))
            if printer is not None:
                printer.put(token.cpu())
        new = torch.stack(tokens, dim=1).cpu()  # waits for the last step
        decode_seconds = time.perf_counter() - start
        del graph, logits, cache
    if printer is not None:
        printer.end()
    stats = GenerationStats(
        prompt_tokens=input_ids.numel(),
        decode_tokens=(new.shape[1] - 1) * batch,
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds if new.shape[1] > 1 else 0.0,
        compile_backend=backend,
    )
    return new.to(device), stats


def generate(
    model,
    tokenizer,
    input_ids: torch.Tensor,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    compile_backend: str | None = None,
    stream: bool = False,
    warn=print,
    capture: bool = True,
) -> tuple[torch.Tensor, GenerationStats]:
    """New token ids ``[B, N]`` and timings. ``compile_backend="graph"``: lit_cb's static-cache loop, one CUDA
    graph replay per token (``capture=False``, or a CPU, runs the same loop eagerly: what the tests check);
    ``"cudagraphs"``/``"inductor"``: a warm-up generation compiles transformers' decode step first; if that
    fails, ``warn`` is told why and generation runs eagerly. ``input_ids`` rows are equal-length prompts."""
    import torch

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    if compile_backend == "graph":
        return _graph_generate(
            model, tokenizer, input_ids, max_new_tokens, temperature, top_p, seed, stream, capture, warn
        )
    attention_mask = torch.ones_like(input_ids)
    quantizer = getattr(model, "hf_quantizer", None)
    if compile_backend is not None and quantizer is not None and not quantizer.is_compileable:
        method = quantizer.quantization_config.quant_method
        warn(
            f"transformers does not compile models quantized with {getattr(method, 'value', method)}; decoding eagerly"
        )
        compile_backend = None
    if compile_backend is not None:
        warmup_cfg = generation_config(model, max_new_tokens, temperature, top_p, compile_backend, tokenizer)
        try:
            torch.manual_seed(seed)
            with _decoding():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=warmup_cfg,
                    stopping_criteria=[_StopAfter(input_ids.shape[1], WARMUP_TOKENS)],
                )
        except Exception as err:  # noqa: BLE001  any compile failure: say it and run eagerly
            warn(f"torch.compile of the decode step failed, running eagerly: {type(err).__name__}: {err}")
            compile_backend = None
    cfg = generation_config(model, max_new_tokens, temperature, top_p, compile_backend, tokenizer)
    clock = _Clock()
    torch.manual_seed(seed)
    with _decoding():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=cfg,
            streamer=_streamer(tokenizer, clock, stream),
        )
    end = time.perf_counter()
    new = out[:, input_ids.shape[1] :]
    # clock.times: [before prefill, first new token (end of prefill), each later token]
    prefill = clock.times[1] - clock.times[0] if len(clock.times) > 1 else end - clock.times[0]
    decode = end - clock.times[1] if len(clock.times) > 1 else 0.0
    stats = GenerationStats(
        prompt_tokens=input_ids.numel(),
        decode_tokens=max(0, new.shape[1] - 1) * new.shape[0],
        prefill_seconds=prefill,
        decode_seconds=decode,
        compile_backend=compile_backend,
    )
    return new, stats


def warn(message: str) -> None:
    """How the commands report a fallback they took: one line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def prepare(args: argparse.Namespace) -> tuple:
    """``(model, tokenizer, compile_backend)`` from the options of :func:`add_decoding_arguments` and
    ``args.model``: the model loaded on its device, fused where that applies, and the decode path the
    options and the device call for. Bad options or a missing model raise ValueError/FileNotFoundError/
    OSError before anything runs."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model, tokenizer = load(args.model, device, dtype)
    if args.compile == "auto":
        compile_backend = "graph" if device.type == "cuda" else None
    else:
        compile_backend = None if args.compile == "off" else args.compile
    # fused slices share one output through a per-input cache, which a torch.compile trace cannot keep
    # (each slice would run the fused layer): fuse for the graph loop and eager decoding only
    if args.fuse == "on" or (args.fuse == "auto" and device.type == "cuda"):
        if compile_backend in TORCH_COMPILE_BACKENDS:
            if args.fuse == "on":
                warn(f"--fuse on is not used with --compile {compile_backend}; use --compile graph")
        else:
            from lit_cb.fused import fuse_projections

            fuse_projections(model)  # inference only: this model is not saved from here
    if compile_backend == "graph" and device.type != "cuda":
        warn("CUDA graphs need a GPU; running the same static-cache decode loop eagerly")
    return model, tokenizer, compile_backend


def main(argv: list[str] | None = None) -> int:
    """``lit_cb generate``; returns the exit status (0 ok, 1 bad model or input; argparse exits 2)."""
    args = build_parser().parse_args(argv)
    try:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty; give the text to answer or continue")
        model, tokenizer, compile_backend = prepare(args)
        input_ids = encode_prompt(tokenizer, args.prompt, chat_template=not args.no_chat_template)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    new, stats = generate(
        model,
        tokenizer,
        input_ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        compile_backend=compile_backend,
        stream=not args.no_stream,
        warn=warn,
    )
    if args.no_stream:
        print(tokenizer.decode(new[0], skip_special_tokens=True), flush=True)
    print(stats.summary(), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
