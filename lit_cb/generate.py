"""``lit_cb generate``: stream text from a lit_cb model, a plain Hugging Face folder or ``smollm2``.

    lit_cb generate outputs/smollm2_codebook/model --prompt "What is a codebook?" --max-new-tokens 128
    lit_cb generate smollm2 --prompt "Once upon a time" --temperature 0.7 --top-p 0.9 --seed 1

The prompt goes through the tokenizer's chat template when it has one (``--no-chat-template`` turns that
off), the reply streams to stdout, and prefill and decode tokens/s go to stderr at the end. Greedy by
default; ``--temperature > 0`` samples (with ``--top-p`` and ``--seed``). On a GPU the decode steps run
on a static KV cache under a fullgraph ``torch.compile`` (``--compile cudagraphs``, the default there:
CUDA graphs of the eager kernels; ``inductor`` also fuses elementwise ops but compiles for about a
minute). The Triton kernels are torch custom ops with fake implementations, so the compressed layers
trace without graph breaks. A short warm-up keeps compilation out of the timing; if compilation
fails the command says so and runs eagerly. On a CPU the model runs eagerly, compressed layers
through their PyTorch reference.

Only :func:`main` is the command; :func:`load`, :func:`encode_prompt` and :func:`generate` are the
pieces it is made of, for scripts (``bench/generate.py``) and tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers load after argument parsing, so --help stays fast
    import torch

WARMUP_TOKENS = 3
COMPILE_BACKENDS = ("inductor", "cudagraphs")
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
        mode = f"static cache + torch.compile ({self.compile_backend})" if self.compile_backend else "eager"
        return (
            f"prefill: {self.prompt_tokens} tokens in {self.prefill_seconds:.3f} s ({self.prefill_tok_s:.1f} tok/s); "
            f"decode: {self.decode_tokens} tokens in {self.decode_seconds:.3f} s ({self.decode_tok_s:.1f} tok/s) "
            f"[{mode}]"
        )


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
    p.add_argument("--max-new-tokens", type=_positive_int, default=128)
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
        help="static KV cache + fullgraph torch.compile of the decode step: cudagraphs (CUDA graphs of the eager "
        "kernels, compiles in seconds) or inductor (also fuses elementwise ops, about a minute to compile); "
        "auto = cudagraphs on a GPU, off on a CPU",
    )
    p.add_argument("--no-chat-template", action="store_true", help="tokenize the prompt as raw text")
    p.add_argument("--no-stream", action="store_true", help="print the reply at the end instead of streaming it")
    return p


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
    knows) or an embedded name; the model in eval mode on ``device``."""
    from lit_cb.models import EMBEDDED_MODELS

    if model in EMBEDDED_MODELS:
        from lit_cb.models import load_model

        return load_model(model, str(dtype).removeprefix("torch."), device)
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {model!r}: no such folder; give a model folder (a lit_cb output's model/ or a Hugging Face "
            f"folder) or one of the embedded models {sorted(EMBEDDED_MODELS)}"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lit_cb  # noqa: F401  registers quant_method lit_cb with transformers
    from lit_cb.serialization import read_quantization_config

    read_quantization_config(path)  # clear errors for a missing or unreadable config.json
    if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path} has no tokenizer (tokenizer_config.json / tokenizer.json)")
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=str(device))
    tokenizer = AutoTokenizer.from_pretrained(path)
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

        if compile_backend not in COMPILE_BACKENDS:
            raise ValueError(f"compile backend {compile_backend!r}; allowed: {COMPILE_BACKENDS}")
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
) -> tuple[torch.Tensor, GenerationStats]:
    """New token ids ``[B, N]`` and timings. With a ``compile_backend`` a warm-up generation compiles the
    decode step first; if that fails, ``warn`` is told why and generation runs eagerly."""
    import torch

    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
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
            with torch.inference_mode():
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
    with torch.inference_mode():
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


def main(argv: list[str] | None = None) -> int:
    """``lit_cb generate``; returns the exit status (0 ok, 1 bad model or input; argparse exits 2)."""
    args = build_parser().parse_args(argv)

    def warn(message: str) -> None:
        print(f"warning: {message}", file=sys.stderr, flush=True)

    try:
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
        model, tokenizer = load(args.model, device, dtype)
        input_ids = encode_prompt(tokenizer, args.prompt, chat_template=not args.no_chat_template)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.compile == "auto":
        compile_backend = "cudagraphs" if device.type == "cuda" else None
    else:
        compile_backend = None if args.compile == "off" else args.compile
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
