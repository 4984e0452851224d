"""Tokenizers: byte-level BPE built from the vocabulary and merges stored in a GGUF file (SmolLM2's
and Qwen2's pre-tokenization), or plain bytes for the tiny random model; and what a client needs
besides (stop tokens, chat format), so it can get all of it from the servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lattice.errors import ConfigError

CHATML = "chatml"  # <|im_start|>role\ncontent<|im_end|>\n (SmolLM2, Qwen2)
PLAIN = "plain"  # "User: ...\nAssistant:" for a vocabulary without chat tokens
CHAT_FORMATS = (CHATML, PLAIN)
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # end a turn / a document, where the vocabulary has them

# Qwen2's pre-tokenization (its tokenizer.json; llama.cpp's "qwen2" pre-tokenizer): letters with one
# leading non-letter, single digits, punctuation runs, newlines apart
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def tokenizers_module() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise ConfigError("the tokenizer needs `pip install tokenizers` (lattice-p2p[mesh])") from None
    return tokenizers


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table: the symbol of byte b is ``byte_symbols()[b]``."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs, strict=True))
    return [chr(table[b]) for b in range(256)]


def byte_tokenizer() -> Any:
    """One token per byte (vocabulary 256, no merges): the tiny random model's tokenizer."""
    tk = tokenizers_module()
    tok = tk.Tokenizer(tk.models.BPE(vocab={s: i for i, s in enumerate(byte_symbols())}, merges=[]))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    return tok


def tokenizer_from_gguf(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` for GPT-2-style BPE GGUF models (SmolLM2's, Qwen2's)."""
    tk = tokenizers_module()
    from lattice.apps.mesh_inference.gguf_reader import gguf_reader

    reader = gguf_reader(Path(path))
    fields = reader.fields
    if "tokenizer.ggml.model" not in fields:
        raise ConfigError(f"{path.name} has no tokenizer")
    if fields["tokenizer.ggml.model"].contents() != "gpt2":
        raise ConfigError(f"{path.name}: only GPT-2 style BPE tokenizers are supported")
    pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else ""
    if "tokenizer.ggml.tokens" not in fields:
        raise ConfigError(f"{path.name} has no token list")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merge_field = fields.get("tokenizer.ggml.merges")  # a vocabulary of bytes only needs none
    merges = [tuple(m.split(" ", 1)) for m in merge_field.contents()] if merge_field is not None else []
    types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else []
    tok = tk.Tokenizer(tk.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    if pre == "qwen2":
        tok.normalizer = tk.normalizers.NFC()
        tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Split(tk.Regex(QWEN2_SPLIT), behavior="isolated"),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
    else:  # SmolLM2's ("smollm"): GPT-2's split, every digit apart
        tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
            tk.pre_tokenizers.Digits(individual_digits=True),
            tk.pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])  # fmt: skip
    tok.decoder = tk.decoders.ByteLevel()
    special = [tk.AddedToken(tokens[i], special=True) for i, kind in enumerate(types) if kind == 3]
    if special:
        tok.add_special_tokens(special)
    return tok


def stop_tokens(tokenizer: Any, eos: int | None = None) -> list[int]:
    """Token ids that end a generation: the model's end-of-sequence and the chat end-of-turn."""
    out = [eos] if eos is not None else []
    for text in STOP_TOKENS:
        tid = tokenizer.token_to_id(text)
        if tid is not None and tid not in out:
            out.append(tid)
    return out


def chat_format(tokenizer: Any) -> str:
    """ChatML where the vocabulary has its tokens, else the plain format."""
    has = all(tokenizer.token_to_id(t) is not None for t in ("<|im_start|>", "<|im_end|>"))
    return CHATML if has else PLAIN


def format_chat(messages: list[tuple[str, str]], fmt: str) -> str:
    """The prompt for (role, content) messages, ending where the assistant's answer begins."""
    if fmt == CHATML:
        turns = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
        return turns + "<|im_start|>assistant\n"
    if fmt == PLAIN:
        turns = "".join(f"{role.capitalize()}: {content}\n" for role, content in messages)
        return turns + "Assistant:"
    raise ConfigError(f"unknown chat format {fmt!r}")
