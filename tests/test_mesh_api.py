"""The OpenAI-compatible endpoint (`lattice-node serve-api`) against a local mesh of `serve-model`
processes, driven by the `openai` Python client: completions and chat, whole and streamed, greedy
text equal to one process's, seeds, stop strings, errors the client understands."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
try:
    import openai
except ImportError:  # the pure tests below still run
    openai = None

from lattice.apps.mesh_inference.api import ApiError, ApiLimits, TextStream, parse_request  # noqa: E402
from lattice.apps.mesh_inference.card import ModelCard  # noqa: E402
from lattice.apps.mesh_inference.errors import MeshError  # noqa: E402
from lattice.apps.mesh_inference.model import Stage, generate_local, random_weights, tiny_config  # noqa: E402
from lattice.apps.mesh_inference.sampling import Sampling  # noqa: E402
from lattice.apps.mesh_inference.tokenizer import byte_tokenizer, format_chat  # noqa: E402
from lattice.testing.daemons import start_daemon  # noqa: E402

MODEL = "tiny-random-0"
CONFIG = tiny_config()
TOKENIZER = byte_tokenizer()


def reference(text: str, n: int, sampling: Sampling | None = None) -> str:
    stage = Stage(CONFIG, random_weights(CONFIG, seed=0), 0, CONFIG.n_layers)
    return TOKENIZER.decode(generate_local([stage], TOKENIZER.encode(text).ids, n, sampling))


def start_mesh(workdir, api_args=()) -> tuple[list, object]:
    """Two stage servers (blocks 0:3, 3:6) and an API node, each its own process."""
    common = ["--model", "tiny-random:0", "--listen", "/ip4/127.0.0.1/tcp/0", "--announce-interval", "2"]
    daemons = [start_daemon(workdir, "s0", [*common, "--blocks", "0:3"], command="serve-model", timeout=60)]
    boot = daemons[0].info["addrs"][0]
    daemons.append(start_daemon(workdir, "s1", [*common, "--blocks", "3:6", "--bootstrap", boot],
                                command="serve-model", timeout=60))  # fmt: skip
    args = ["--model", "tiny-random:0", "--bootstrap", boot, "--http", "127.0.0.1:0", "--listen",
            "/ip4/127.0.0.1/tcp/0", *api_args]  # fmt: skip
    api = start_daemon(workdir, "api", args, command="serve-api", timeout=60)
    daemons.append(api)
    return daemons, api


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    if openai is None:
        pytest.skip("the openai client is not installed (pip install openai)")
    workdir = tmp_path_factory.mktemp("api")
    os.environ["LATTICE_MESH_RUNTIME_DIR"] = str(workdir / "mesh-servers")  # other engineers' servers
    daemons, api = start_mesh(workdir)
    try:
        client = openai.OpenAI(base_url=api.info["url"], api_key="unused", max_retries=0, timeout=30)
        # the first request waits for the servers' announcements (a fresh mesh)
        for _ in range(100):
            try:
                client.models.list()
                break
            except openai.APIStatusError:
                import time

                time.sleep(0.2)
        yield client
    finally:
        for d in reversed(daemons):
            d.stop()
        os.environ.pop("LATTICE_MESH_RUNTIME_DIR", None)


def test_models_lists_the_mesh_model(endpoint):
    assert [m.id for m in endpoint.models.list().data] == [MODEL]


def test_a_greedy_completion_is_the_single_process_text(endpoint):
    resp = endpoint.completions.create(model=MODEL, prompt="Hello mesh", max_tokens=12, temperature=0)
    choice = resp.choices[0]
    assert choice.text == reference("Hello mesh", 12) and choice.finish_reason == "length"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (10, 12)
    streamed = endpoint.completions.create(model=MODEL, prompt="Hello mesh", max_tokens=12, temperature=0,
                                           stream=True)  # fmt: skip
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) >= 3


def test_chat_with_a_seed_is_reproducible_and_streams_the_same_text(endpoint):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    kw = dict(model=MODEL, messages=messages, max_tokens=10, temperature=0.8, top_p=0.9, seed=42)
    first = endpoint.chat.completions.create(**kw)
    message = first.choices[0].message
    assert message.role == "assistant"
    prompt = format_chat([("system", "Be brief."), ("user", "Hi!")], "plain")
    assert message.content == reference(prompt, 10, Sampling(temperature=0.8, top_p=0.9, seed=42))
    assert endpoint.chat.completions.create(**kw).choices[0].message.content == message.content
    chunks = list(endpoint.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == message.content
    assert chunks[-1].usage.completion_tokens == 10


def test_a_stop_string_ends_the_text_before_it(endpoint):
    full = reference("Hello mesh", 12)
    stop = full[4:6]
    cut = full[: full.find(stop)]
    resp = endpoint.completions.create(
        model=MODEL, prompt="Hello mesh", max_tokens=12, temperature=0, stop=[stop]
    )
    assert resp.choices[0].text == cut and resp.choices[0].finish_reason == "stop"
    chunks = list(endpoint.completions.create(model=MODEL, prompt="Hello mesh", max_tokens=12, temperature=0,
                                              stop=stop, stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_errors_reach_the_client_as_openai_errors(endpoint):
    with pytest.raises(openai.NotFoundError, match="not served here"):
        endpoint.completions.create(model="gpt-4", prompt="x")
    with pytest.raises(openai.BadRequestError, match=r"max_tokens must be an integer in 1\.\.512"):
        endpoint.completions.create(model=MODEL, prompt="x", max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="n is not supported"):
        endpoint.completions.create(model=MODEL, prompt="x", n=2)
    with pytest.raises(openai.BadRequestError, match="prompt"):
        endpoint.completions.create(model=MODEL, prompt="")
    resp = endpoint.completions.create(
        model=MODEL, prompt=[72, 105], max_tokens=3, temperature=0
    )  # token ids
    assert resp.choices[0].text == reference("Hi", 3)


# -- the pure parts


def _card(**kw) -> ModelCard:
    return ModelCard(MODEL, CONFIG, chat="plain", **kw)


def test_requests_are_checked_field_by_field():
    limits = ApiLimits(max_tokens=64)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 5, "top_k": 3, "seed": 1}
    ok = parse_request(body, False, _card(), limits)
    assert (
        ok.prompt == "hi" and ok.max_tokens == 5 and ok.sampling.top_k == 3 and ok.sampling.temperature == 1.0
    )
    parts = [{"type": "text", "text": "a"}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": parts}], "max_completion_tokens": 7}
    chat = parse_request(body, True, _card(), limits)
    assert chat.prompt == "User: a\nAssistant:" and chat.max_tokens == 7
    bad = [
        ({"model": MODEL, "prompt": "x", "temperature": 3}, "temperature"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 65}, "max_tokens"),
        ({"model": MODEL, "prompt": [1, 2, 999]}, "prompt"),
        ({"model": MODEL, "prompt": ["a", "b"]}, "prompt"),
        ({"model": MODEL, "prompt": "x", "stop": ["a"] * 5}, "stop"),
        ({"model": MODEL, "prompt": "x", "stop": "y" * 65}, "stop"),
        ({"model": MODEL, "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ({"model": MODEL, "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"model": MODEL, "messages": [{"role": "user", "content": {"x": 1}}]}, "text"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "x"}] * 65}, "messages"),
        ("not an object", "object"),
    ]
    for body, needle in bad:
        chat = isinstance(body, dict) and "messages" in body
        with pytest.raises(ApiError, match=needle) as err:
            parse_request(body, chat, _card(), limits)
        assert err.value.status == 400
    with pytest.raises(ApiError) as err:
        parse_request({"model": MODEL, "messages": [{"role": "user", "content": "x"}]}, True,
                      ModelCard(MODEL, CONFIG), limits)  # fmt: skip
    assert "no chat format" in err.value.message


def test_streamed_text_holds_back_split_characters_and_stop_strings():
    tok = byte_tokenizer()
    text = TextStream(tok.decode, ["END"])
    deltas = [text.push(b) for b in "é ok EN".encode()]
    assert deltas[0] == "" and "".join(deltas) == "é ok "  # half a character, then "EN" held back
    assert text.push(ord("D")) == "" and text.stopped and text.sent == "é ok "
    plain = TextStream(tok.decode, [])
    assert "".join(plain.push(b) for b in "naïve".encode()) + plain.finish() == "naïve"


def test_a_card_from_a_stranger_is_checked_field_by_field():
    good = _card(tokenizer="bafkr4i" + "a" * 52, tokenizer_bytes=1000, stop=(1, 2)).encode()
    assert ModelCard.decode(good).stop == (1, 2)
    for change in ({"config": {**good["config"], "hidden": 1 << 40}}, {"config": {**good["config"], "x": 1}},
                   {"tokenizer_bytes": 1 << 40}, {"stop": [CONFIG.vocab_size]}, {"stop": list(range(17))},
                   {"chat": "jinja"}, {"dtype": "int4"}, {"model_id": ""}, {"tokenizer": 5}):  # fmt: skip
        with pytest.raises(MeshError, match="model card"):
            ModelCard.decode({**good, **change})
