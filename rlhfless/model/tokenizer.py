"""Tokenizers behind one small protocol: token ids are plain `list[int]` everywhere else."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    eos_token_id: int
    pad_token_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def render_prompt(self, user_text: str, system: str | None = None) -> str: ...

    def render_chat(self, messages: list[dict[str, str]]) -> str: ...


def _plain_chat(messages: list[dict[str, str]]) -> str:
    """A conversation as plain text, for models without a chat template."""
    head = "".join(f"{m['content']}\n\n" for m in messages if m["role"] == "system")
    turns = "".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n"
                    for m in messages if m["role"] != "system")
    return f"{head}{turns}Assistant:"


def _as_messages(user_text: str, system: str | None) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    return [*messages, {"role": "user", "content": user_text}]


class CharTokenizer:
    """One token per ASCII character (vocabulary 128), for tiny random models.

    Id = `ord(char)`. Two control characters that never occur in normal text are special:
    EOS = 0 (NUL) and PAD = 1 (SOH); they are distinct so that a pad can never be mistaken for
    an emitted end of sequence. Characters outside ASCII encode as '?'; `decode` drops the
    special ids and renders ids outside the vocabulary (a tiny model may have a larger
    embedding than 128) as '?'.
    """

    EOS = 0
    PAD = 1
    kind = "char"

    def __init__(self) -> None:
        self.eos_token_id = self.EOS
        self.pad_token_id = self.PAD
        self.vocab_size = 128

    def encode(self, text: str) -> list[int]:
        return [o if (o := ord(c)) < 128 else ord("?") for c in text]

    def decode(self, ids: list[int]) -> str:
        special = (self.EOS, self.PAD)
        return "".join(chr(i) if 0 <= i < 128 else "?" for i in ids if i not in special)

    def render_prompt(self, user_text: str, system: str | None = None) -> str:
        return self.render_chat(_as_messages(user_text, system))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return _plain_chat(messages)

    def save(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "char_tokenizer.json").write_text(json.dumps({"kind": self.kind}))


class HFTokenizer:
    """Wraps a transformers tokenizer.

    `encode` adds no special tokens: prompts are rendered with the chat template, which
    already spells out the special tokens it wants (adding them again would double the BOS).
    """

    kind = "hf"

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer defines no eos_token_id")
        self.eos_token_id = int(eos)
        pad = hf_tokenizer.pad_token_id
        # Many causal LMs ship without a pad token; pads are always masked, so eos is safe.
        self.pad_token_id = int(pad) if pad is not None else self.eos_token_id
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    def render_prompt(self, user_text: str, system: str | None = None) -> str:
        return self.render_chat(_as_messages(user_text, system))

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.hf, "chat_template", None):
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return _plain_chat(messages)

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Rebuild a tokenizer written by `save` (CharTokenizer or HFTokenizer)."""
    directory = Path(directory)
    if (directory / "char_tokenizer.json").exists():
        return CharTokenizer()
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))
