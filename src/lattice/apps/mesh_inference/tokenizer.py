"""A byte-level BPE tokenizer built from the vocabulary and merges stored in a GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lattice.errors import ConfigError


def tokenizer_from_gguf(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` for GPT-2-style BPE GGUF models (SmolLM2's)."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise ConfigError("the tokenizer needs `pip install tokenizers` (lattice-p2p[mesh])") from None
    from lattice.apps.mesh_inference.gguf_reader import gguf_reader

    reader = gguf_reader(Path(path))
    fields = reader.fields
    if fields["tokenizer.ggml.model"].contents() != "gpt2":
        raise ConfigError(f"{path.name}: only GPT-2 style BPE tokenizers are supported")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    types = fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields else []
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(tokens[i], special=True) for i, kind in enumerate(types) if kind == 3]
    if special:
        tok.add_special_tokens(special)
    return tok
