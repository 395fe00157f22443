"""``lit_cb chat`` (lit_cb.chat.main): every reply against transformers' own generate on the templated
conversation that a reader of the module docstring would build by hand."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lit_cb.chat import main

# fixtures: the tiny compressed model folder; lively_dirs, its variant that does not repeat one token
from .test_generate import compressed_dir, lively_dirs  # noqa: F401

# Roles as common words of the tiny word-level vocabulary, so that every role is a real token.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}the {% elif m['role'] == 'assistant' %}of "
    "{% else %}and {% endif %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}of{% endif %}"
)
FIRST = "the state of the school"
SECOND = "and the people of the city"


def _with_template(src: Path, dst: Path, context: int | None = None) -> Path:
    """A copy of the model folder ``src`` whose tokenizer has :data:`TEMPLATE` (and, if given, a model
    context of ``context`` positions)."""
    shutil.copytree(src, dst)
    tokenizer = AutoTokenizer.from_pretrained(dst)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(dst)
    if context is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["max_position_embeddings"] = context
        (dst / "config.json").write_text(json.dumps(cfg))
        (dst / "manifest.json").unlink(missing_ok=True)  # an edited folder no longer matches its manifest
    return dst


@pytest.fixture(scope="module")
def chat_dir(lively_dirs, tmp_path_factory):  # noqa: F811
    return _with_template(lively_dirs["compressed"], tmp_path_factory.mktemp("chat") / "model")


@pytest.fixture(scope="module")
def short_dir(lively_dirs, tmp_path_factory):  # noqa: F811
    """The same model told that its context is 28 positions: 20 for the prompt next to 8 new tokens, room
    for one exchange (7 tokens of prompt) but not for two."""
    return _with_template(lively_dirs["compressed"], tmp_path_factory.mktemp("short") / "model", context=28)


def _reply(folder: Path, messages: list[dict], max_new_tokens: int = 8) -> str:
    """transformers' greedy generate on the templated ``messages``, decoded as the chat decodes."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    ids = ids["input_ids"]
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _chat(folder: Path, lines: list[str], capsys, *args: str) -> tuple[int, list[str], str]:
    rc = main([str(folder), "--max-new-tokens", "8", *args], stdin=io.StringIO("".join(f"{x}\n" for x in lines)))
    out = capsys.readouterr()
    return rc, out.out.splitlines(), out.err


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def test_each_reply_equals_generate_on_the_whole_templated_history(chat_dir, capsys):
    rc, replies, err = _chat(chat_dir, [FIRST, "", SECOND], capsys)
    assert rc == 0, err
    first = _reply(chat_dir, [_user(FIRST)])
    second = _reply(chat_dir, [_user(FIRST), _assistant(first), _user(SECOND)])
    assert len(set(first.split())) >= 4  # a real reply, not one repeated word or an immediate end
    assert second != _reply(chat_dir, [_user(SECOND)])  # so the history visibly matters
    assert replies == [first, second]  # the empty line was no message


def test_a_run_folder_stands_for_its_saved_model(chat_dir, tmp_path, capsys):
    run = tmp_path / "outputs" / "run"
    shutil.copytree(chat_dir, run / "model")  # as a run leaves it: outputs/<run>/model/compression.json
    rc, replies, err = _chat(run, [FIRST], capsys)
    assert rc == 0, err
    assert replies == [_reply(chat_dir, [_user(FIRST)])]


def test_the_system_message_leads_every_turn(chat_dir, capsys):
    rc, replies, err = _chat(chat_dir, [FIRST, SECOND], capsys, "--system", "new york")
    assert rc == 0, err
    system = {"role": "system", "content": "new york"}
    first = _reply(chat_dir, [system, _user(FIRST)])
    assert first != _reply(chat_dir, [_user(FIRST)])
    assert replies == [first, _reply(chat_dir, [system, _user(FIRST), _assistant(first), _user(SECOND)])]


def test_reset_forgets_the_history_and_exit_ends_the_chat(chat_dir, capsys):
    rc, replies, err = _chat(chat_dir, [FIRST, "/reset", FIRST, "/exit", SECOND], capsys)
    assert rc == 0, err
    first = _reply(chat_dir, [_user(FIRST)])
    assert first != _reply(chat_dir, [_user(FIRST), _assistant(first), _user(FIRST)])  # history would show
    assert replies == [first, first]  # nothing after /exit
    assert "(history cleared)" in err


def test_the_oldest_exchange_is_dropped_when_the_context_is_full(short_dir, capsys):
    tokenizer = AutoTokenizer.from_pretrained(short_dir)
    first = _reply(short_dir, [_user(FIRST)])
    both = tokenizer.apply_chat_template([_user(FIRST), _assistant(first), _user(SECOND)], add_generation_prompt=True)
    alone = tokenizer.apply_chat_template([_user(SECOND)], add_generation_prompt=True)
    assert len(both["input_ids"]) > 28 - 8 >= len(alone["input_ids"])  # the history does not fit; SECOND does
    rc, replies, err = _chat(short_dir, [FIRST, SECOND], capsys)
    assert rc == 0, err
    assert replies == [first, _reply(short_dir, [_user(SECOND)])]
    assert "the 1 oldest exchange(s) no longer fit" in err


def test_a_message_too_long_alone_is_refused_and_the_chat_goes_on(short_dir, capsys):
    long = " ".join(["the"] * 40)  # with the template: "the" + 40 x "the" + "of", 42 tokens
    rc, replies, err = _chat(short_dir, [long, SECOND], capsys)
    assert rc == 0, err
    assert "error: the message takes 42 tokens with the template, and at most 20 fit" in err
    assert replies == [_reply(short_dir, [_user(SECOND)])]  # the refused message left no trace


def test_a_refused_message_keeps_the_history_it_found(chat_dir, capsys):
    long = " ".join(["the"] * 600)  # longer than the whole 512-position context
    rc, replies, err = _chat(chat_dir, [FIRST, long, SECOND], capsys)
    assert rc == 0, err
    assert "error: the message takes 602 tokens with the template" in err
    first = _reply(chat_dir, [_user(FIRST)])
    assert replies == [first, _reply(chat_dir, [_user(FIRST), _assistant(first), _user(SECOND)])]


def test_sampling_is_seeded_per_turn(chat_dir, capsys):
    sampled = ["--temperature", "1.3", "--top-p", "0.9"]
    runs = [_chat(chat_dir, [FIRST, FIRST, "/reset", FIRST], capsys, *sampled, "--seed", s)[1] for s in "556"]
    assert runs[0] == runs[1] != runs[2]
    # the third reply restarts the history but not the seed: turn 2 samples with seed + 2
    assert runs[0][2] != runs[0][0]


def test_a_tokenizer_without_a_chat_template_is_refused_before_the_model_loads(
    compressed_dir,  # noqa: F811
    capsys,
    monkeypatch,
):
    import lit_cb.generate

    monkeypatch.setattr(lit_cb.generate, "load", lambda *a: pytest.fail("the model was loaded"))
    rc, replies, err = _chat(compressed_dir, [FIRST], capsys)
    assert (rc, replies) == (1, [])
    assert "has no chat template" in err and "lit_cb generate --no-chat-template" in err


def test_no_room_for_a_message_is_refused_before_reading_any(short_dir, capsys):
    rc, replies, err = _chat(short_dir, [FIRST], capsys, "--max-new-tokens", "28")
    assert (rc, replies) == (1, [])
    assert "--max-new-tokens 28 leaves no room for a message in a 28-token context" in err
