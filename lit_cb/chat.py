"""``lit_cb chat``: a conversation with a lit_cb model, a plain Hugging Face folder or ``smollm2``.

    lit_cb chat outputs/smollm2_codebook/model
    lit_cb chat smollm2 --system "You answer in one sentence." --temperature 0.7 --top-p 0.9

Each line read from standard input is a user message; the reply streams to stdout. The whole
conversation goes through the tokenizer's chat template every turn, so the model sees the history
exactly as the template lays it out (a model without a chat template is refused: use ``lit_cb
generate --no-chat-template`` for raw text). When the history and ``--max-new-tokens`` no longer fit
the model's context (``max_position_embeddings``), the oldest exchanges are dropped, with a note on
stderr; a message too long to fit even alone is refused and the conversation goes on. ``/reset``
forgets the history (the system message stays), ``/exit``, ``/quit`` or the end of input ends it.

Decoding is ``lit_cb generate``'s (same options, same paths: CUDA-graph loop on a GPU, eager on a CPU);
turn ``i`` (from 0) samples with seed ``--seed + i``, so a sampled conversation is reproducible.
Typed at a terminal, the command prompts with ``>>`` on stderr; piped, it prints replies only, one per
message, each followed by a newline.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from lit_cb.generate import add_decoding_arguments, generate, prepare, warn

if TYPE_CHECKING:  # torch loads after argument parsing, so --help stays fast
    import torch

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lit_cb chat",
        description="Chat with a lit_cb compressed model, a plain Hugging Face model folder or 'smollm2': one "
        f"user message per input line; {RESET_COMMAND} forgets the history, {' or '.join(EXIT_COMMANDS)} ends.",
    )
    p.add_argument("model", help="model folder (lit_cb output or plain Hugging Face), or the embedded name 'smollm2'")
    p.add_argument("--system", default=None, help="a system message kept at the start of every turn")
    add_decoding_arguments(p, max_new_tokens=256)
    return p


@dataclass
class Conversation:
    """The messages so far, and the input ids of the next turn within a token budget."""

    system: str | None = None
    turns: list[dict[str, str]] = field(default_factory=list)  # user and assistant messages, alternating

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns

    def reset(self) -> None:
        self.turns.clear()

    def prompt_ids(self, tokenizer, max_tokens: int) -> tuple[torch.Tensor, int]:
        """``([1, T] input ids, exchanges dropped)``: the templated conversation with a generation prompt,
        the oldest user/assistant exchanges left out (and forgotten) until it is at most ``max_tokens``
        long. Raises ValueError if the last user message alone is longer; that message is then taken
        back and the history kept as it was, so the conversation can go on."""
        history = self.turns[:-1]
        dropped = 0
        while True:
            ids = tokenizer.apply_chat_template(
                self.messages(), add_generation_prompt=True, return_dict=True, return_tensors="pt"
            )["input_ids"]
            if ids.shape[-1] <= max_tokens:
                return ids, dropped
            if len(self.turns) <= 1:
                self.turns = history
                raise ValueError(
                    f"the message takes {ids.shape[-1]} tokens with the template, and at most {max_tokens} fit "
                    "the model's context next to --max-new-tokens; shorten it or lower --max-new-tokens"
                )
            del self.turns[:2]
            dropped += 1


def check_chat_template(model: str) -> None:
    """Refuse a model folder whose tokenizer has no chat template, loading only the tokenizer (the
    embedded models have one)."""
    from pathlib import Path

    from lit_cb.models import EMBEDDED_MODELS

    if model in EMBEDDED_MODELS:
        return
    from lit_cb.serialization import model_folder

    folder = model_folder(Path(model).expanduser())
    if not (folder / "tokenizer_config.json").is_file():
        return  # not a model folder with a tokenizer: loading the model says what is wrong
    from transformers import AutoTokenizer

    if not getattr(AutoTokenizer.from_pretrained(folder), "chat_template", None):
        raise ValueError(
            f"{model}: its tokenizer has no chat template, so there is no conversation format; "
            "use `lit_cb generate --no-chat-template` for raw text"
        )


def context_length(model) -> int | None:
    """The longest sequence the model was built for (None: its config does not say)."""
    return getattr(model.config, "max_position_embeddings", None)


def chat(
    model,
    tokenizer,
    conversation: Conversation,
    lines: TextIO,
    interactive: bool,
    compile_backend: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> int:
    """Answer every message read from ``lines`` until an exit command or the end; returns the number of
    replies. Each reply streams to stdout and ends with a newline (the streamer's)."""
    limit = context_length(model)
    budget = limit - max_new_tokens if limit else sys.maxsize
    if budget < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} leaves no room for a message in a {limit}-token context")
    replies = 0
    while True:
        if interactive:
            print(">> ", end="", file=sys.stderr, flush=True)
        line = lines.readline()
        if not line:
            break
        text = line.strip()
        if text in EXIT_COMMANDS:
            break
        if text == RESET_COMMAND:
            conversation.reset()
            print("(history cleared)", file=sys.stderr, flush=True)
            continue
        if not text:
            continue
        conversation.turns.append({"role": "user", "content": text})
        try:
            ids, dropped = conversation.prompt_ids(tokenizer, budget)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            continue
        if dropped:
            print(f"(the {dropped} oldest exchange(s) no longer fit the context and were dropped)", file=sys.stderr)
        new, _ = generate(
            model,
            tokenizer,
            ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed + replies,
            compile_backend=compile_backend,
            stream=True,
            warn=warn,
        )
        reply = tokenizer.decode(new[0], skip_special_tokens=True)
        conversation.turns.append({"role": "assistant", "content": reply})
        replies += 1
    return replies


def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    """``lit_cb chat``; returns the exit status (0 ok, 1 bad model or input; argparse exits 2)."""
    args = build_parser().parse_args(argv)
    stdin = sys.stdin if stdin is None else stdin
    try:
        check_chat_template(args.model)  # before the model loads: a 7B takes a minute to
        model, tokenizer, compile_backend = prepare(args)
        chat(
            model,
            tokenizer,
            Conversation(system=args.system),
            stdin,
            interactive=stdin.isatty(),
            compile_backend=compile_backend,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
