"""What a thin client needs to use a model it has no copy of, as the stage servers tell it.

A server's ``mesh.info`` carries a card: the model's config, the content id of its tokenizer (the
``tokenizers`` JSON, added to the server's content store, so clients fetch it verified chunk by
chunk from any server holding it), the stop tokens and the chat format. Everything in a card came
from a stranger: :meth:`ModelCard.decode` checks each field, and the tokenizer's size is bounded
before it is fetched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lattice.apps.mesh_inference.config import DTYPES, LlamaConfig
from lattice.apps.mesh_inference.errors import MeshError
from lattice.apps.mesh_inference.tokenizer import CHAT_FORMATS

MAX_TOKENIZER_BYTES = 32 << 20  # Qwen2's tokenizer JSON is ~7 MB, SmolLM2's ~2 MB
MAX_STOP = 16
MAX_MODEL_ID = 256


@dataclass(frozen=True)
class ModelCard:
    model_id: str
    config: LlamaConfig
    tokenizer: str | None = None  # content id of the tokenizer JSON
    tokenizer_bytes: int = 0
    stop: tuple[int, ...] = ()  # token ids that end a generation
    chat: str | None = None  # chat prompt format (tokenizer.CHAT_FORMATS)
    dtype: str = "float32"  # what the server computes in

    def encode(self) -> dict:
        return {"model_id": self.model_id, "config": self.config.as_dict(), "tokenizer": self.tokenizer,
                "tokenizer_bytes": self.tokenizer_bytes, "stop": list(self.stop), "chat": self.chat,
                "dtype": self.dtype}  # fmt: skip

    @classmethod
    def decode(cls, d: Any) -> ModelCard:
        """A card from a server's reply; MeshError naming the first bad field."""
        if not isinstance(d, dict):
            raise MeshError("the server sent no model card")
        model_id, tok, size, stop = (
            d.get("model_id"),
            d.get("tokenizer"),
            d.get("tokenizer_bytes", 0),
            d.get("stop", []),
        )
        if not isinstance(model_id, str) or not 0 < len(model_id) <= MAX_MODEL_ID:
            raise MeshError("model card: bad model_id")
        try:
            config = LlamaConfig.from_dict(d.get("config"))
        except ValueError as exc:
            raise MeshError(f"model card: {exc}") from None
        if tok is not None and (not isinstance(tok, str) or not 0 < len(tok) <= 128):
            raise MeshError("model card: bad tokenizer id")
        if type(size) is not int or not 0 <= size <= MAX_TOKENIZER_BYTES:
            raise MeshError(f"model card: tokenizer size must be 0..{MAX_TOKENIZER_BYTES} bytes")
        if not isinstance(stop, list) or len(stop) > MAX_STOP:
            raise MeshError(f"model card: at most {MAX_STOP} stop tokens")
        if not all(type(t) is int and 0 <= t < config.vocab_size for t in stop):
            raise MeshError("model card: stop tokens must be token ids of the vocabulary")
        chat, dtype = d.get("chat"), d.get("dtype", "float32")
        if chat is not None and chat not in CHAT_FORMATS:
            raise MeshError("model card: unknown chat format")
        if dtype not in DTYPES:
            raise MeshError("model card: unknown dtype")
        return cls(model_id, config, tok, size, tuple(stop), chat, dtype)
