"""The OpenAI-compatible server, driven over HTTP by the official `openai` client and raw httpx.

One uvicorn server (in a thread, on a free 127.0.0.1 port) over a tiny random Llama serves
the whole module; a second, deliberately small one checks the overload answer (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from pagedllm.core.async_engine import AsyncLLMEngine
from pagedllm.core.config import ServerConfig
from pagedllm.entrypoints.openai.api_server import build_app
from pagedllm.testing.tiny import make_tiny_model

API_KEY = "sk-test"
MAX_MODEL_LEN = 128
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]


@contextlib.contextmanager
def running_server(engine: AsyncLLMEngine, **server_options):
    """Serve ``build_app(engine)`` on a free port in a thread; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = build_app(engine, ServerConfig(**server_options))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # The model's vocabulary matches the tokenizer's, so every generated token has text.
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", vocab_size=400)


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = AsyncLLMEngine.from_options(
        model=str(model_dir), block_size=4, num_kv_blocks=1024, max_model_len=MAX_MODEL_LEN,
        max_num_batched_tokens=256, served_model_name=["tiny", "tiny-alias"],
    )
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def base_url(engine):
    with running_server(engine, api_key=API_KEY) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        yield http


def metrics(http: httpx.Client) -> dict[str, float]:
    """Every sample of /metrics, by name (labels other than model_name folded into the name)."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(http.get("/metrics").text):
        for s in family.samples:
            extra = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "model_name")
            samples[s.name + (f"{{{extra}}}" if extra else "")] = s.value
    return samples


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def engine_idle(http: httpx.Client) -> bool:
    m = metrics(http)
    return m["pagedllm:num_requests_running"] == 0 and m["pagedllm:num_requests_waiting"] == 0 \
        and m["pagedllm:kv_cache_usage_perc"] == 0


def sse_events(response: httpx.Response) -> list[str]:
    """The data of each server-sent event; asserts the framing (`data: ...` then a blank line)."""
    body = response.read().decode()
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events), body
    return [e[len("data: "):] for e in events]


def assert_error(response: httpx.Response, status: int, param: str | None = None, text: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if text is not None:
        assert text in error["message"], error
    return error


# -- models, names, auth, small endpoints ------------------------------------------------------


def test_models_served_names_and_alias(client):
    assert [m.id for m in client.models.list().data] == ["tiny", "tiny-alias"]
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"
    out = client.completions.create(model="tiny-alias", prompt="hello", max_tokens=2)
    assert out.model == "tiny"  # responses report the first name


def test_unknown_model_is_404(client, http):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=MESSAGES, max_tokens=2)
    error = assert_error(http.post("/v1/completions", json={"model": "gpt-4", "prompt": "hi"}), 404, "model")
    assert "gpt-4" in error["message"] and error["code"] == "model_not_found"


def test_api_key_guards_v1_routes_only(base_url):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()
    with httpx.Client(base_url=base_url) as anonymous:
        error = assert_error(anonymous.post("/v1/completions", json={"model": "tiny", "prompt": "hi"}), 401)
        assert error["type"] == "authentication_error"
        assert_error(anonymous.get("/v1/models"), 401)
        assert anonymous.get("/health").status_code == 200
        assert anonymous.get("/version").json()["version"]
        assert "pagedllm:num_requests_running" in anonymous.get("/metrics").text


def test_tokenize_and_detokenize(http, engine):
    tokens = http.post("/tokenize", json={"model": "tiny", "prompt": "The quick brown fox"}).json()
    assert tokens["tokens"] == engine.tokenizer("The quick brown fox").input_ids
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"] == "The quick brown fox"
    assert_error(http.post("/detokenize", json={"tokens": [5, 100000]}), 400, "tokens")
    assert_error(http.post("/tokenize", json={"model": "tiny"}), 400)


def test_chat_template_options_match_transformers(http, engine):
    tokenizer = engine.tokenizer
    conversation = [*MESSAGES, {"role": "assistant", "content": "jumps over"}]
    for options in ({"add_generation_prompt": True}, {"add_generation_prompt": False},
                    {"add_generation_prompt": False, "continue_final_message": True}):
        text = tokenizer.apply_chat_template(conversation, tokenize=False, **options)
        expected = tokenizer(text, add_special_tokens=False).input_ids
        got = http.post("/tokenize", json={"messages": conversation, **options}).json()["tokens"]
        assert got == expected, options
    assert http.post("/detokenize", json={"tokens": got}).json()["prompt"].endswith("jumps over")
    custom = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    got = http.post("/tokenize", json={"messages": MESSAGES, "chat_template": custom}).json()["tokens"]
    assert tokenizer.decode(got) == "[user] The quick brown fox\n"


# -- completions and chat ------------------------------------------------------------------------


def test_completion_usage_agrees_with_tokenize(client, http):
    out = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    count = http.post("/tokenize", json={"prompt": "The quick brown fox"}).json()["count"]
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert out.usage.prompt_tokens == count
    assert out.usage.completion_tokens == 7 and out.usage.total_tokens == count + 7
    assert out.choices[0].finish_reason == "length" and out.choices[0].text


def test_chat_usage_agrees_with_tokenize(client, http):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True})
    count = http.post("/tokenize", json={"messages": MESSAGES}).json()["count"]
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.usage.prompt_tokens == count and out.usage.completion_tokens == 5
    assert out.choices[0].finish_reason == "length"


def test_streamed_completion_equals_non_streamed(client):
    kwargs = dict(model="tiny", prompt="Paged attention keeps", max_tokens=24, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_chat_equals_non_streamed(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=24, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage == whole.usage and chunks[-1].object == "chat.completion.chunk"


def test_sse_framing_ends_with_done(http):
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 5, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_n_samples_non_streamed_and_streamed(client):
    kwargs = dict(model="tiny", prompt="Continuous batching", max_tokens=10, temperature=1.0, seed=5, n=3,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    assert sorted(c.index for c in whole.choices) == [0, 1, 2]
    assert len({c.text for c in whole.choices}) == 3  # different samples
    assert whole.usage.completion_tokens == 30
    texts = ["", "", ""]
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]  # seeded: reproducible

    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, n=2, temperature=1.0)
    assert sorted(c.index for c in chat.choices) == [0, 1]


def test_list_of_prompts_and_token_id_prompts(client, engine):
    ids = engine.tokenizer("The quick brown fox").input_ids
    out = client.completions.create(model="tiny", prompt=["The quick brown fox", "hello"], max_tokens=4, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=4, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert by_ids.choices[0].text == out.choices[0].text
    batch = client.completions.create(model="tiny", prompt=[ids, ids[:3]], max_tokens=4, temperature=0)
    assert batch.choices[0].text == out.choices[0].text and len(batch.choices) == 2


def test_completion_logprobs_match_transformers(client, model_dir, engine):
    import torch
    import transformers

    prompt = "The quick brown fox"
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=3, echo=True)
    out = client.completions.create(**kwargs)
    choice, lp, num_prompt = out.choices[0], out.choices[0].logprobs, out.usage.prompt_tokens
    assert choice.text.startswith(prompt)
    assert len(lp.tokens) == num_prompt + out.usage.completion_tokens == len(lp.token_logprobs)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing precedes the first token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert "".join(lp.tokens[:num_prompt]) == prompt

    # Reference: transformers' greedy continuation and log-softmax over the same tokens.
    lp = client.completions.create(**kwargs, extra_body={"return_tokens_as_token_ids": True}).choices[0].logprobs
    ids = [int(t.removeprefix("token_id:")) for t in lp.tokens]
    prompt_ids = engine.tokenizer(prompt).input_ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False, eos_token_id=None)
        ref = torch.log_softmax(hf(greedy).logits[0].float(), dim=-1)
    assert ids == greedy[0].tolist()
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref[i - 1, ids[i]].item(), abs=2e-3)
        top = ref[i - 1].topk(3)
        expected = {f"token_id:{t}": v for t, v in zip(top.indices.tolist(), top.values.tolist())}
        assert set(expected) <= set(lp.top_logprobs[i]) and len(lp.top_logprobs[i]) <= 4
        for key, value in expected.items():
            assert lp.top_logprobs[i][key] == pytest.approx(value, abs=2e-3)


def test_chat_logprobs_shape(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                         logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for item in content:
        assert item.bytes == list(item.token.encode("utf-8")) and item.logprob <= 0
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob == pytest.approx(item.logprob)  # greedy: the chosen one is the best
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                              logprobs=True, top_logprobs=2, stream=True)
    tokens = [c.token for chunk in streamed for choice in chunk.choices if choice.logprobs for c in choice.logprobs.content]
    assert tokens == [c.token for c in content]


def test_stop_strings_streamed_and_not(client):
    kwargs = dict(model="tiny", prompt="Continuous batching lets", temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(**kwargs, max_tokens=24).choices[0].text
    stop = full[8:11]
    assert len(stop) == 3 and stop in full
    cut = client.completions.create(**kwargs, max_tokens=24, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]
    assert cut.model_extra["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, max_tokens=24, stop=[stop], stream=True))
    assert streamed == cut.text  # held-back text is never sent and taken back
    kwargs["extra_body"] = {"ignore_eos": True, "include_stop_str_in_output": True}
    kept = client.completions.create(**kwargs, max_tokens=24, stop=[stop])
    assert kept.choices[0].text == full[: full.index(stop) + len(stop)]


def test_echo_and_suffix(client, http):
    out = client.completions.create(model="tiny", prompt="hello there", max_tokens=3, echo=True, temperature=0)
    assert out.choices[0].text.startswith("hello there")
    chunks = list(client.completions.create(model="tiny", prompt="hello there", max_tokens=3, echo=True,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "suffix": "x"}), 400, "suffix")


def test_chat_continue_final_message_and_echo(client):
    conversation = [*MESSAGES, {"role": "assistant", "content": "jumps"}]
    out = client.chat.completions.create(
        model="tiny", messages=conversation, max_tokens=4, temperature=0,
        extra_body={"continue_final_message": True, "add_generation_prompt": False, "echo": True},
    )
    assert out.choices[0].message.content.startswith("jumps")


# -- bad input ---------------------------------------------------------------------------------

LONG_PROMPT = list(range(10, 10 + MAX_MODEL_LEN - 4))

BAD_REQUESTS = [
    # (route, body, status, param, text in message)
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": -1}, 400, "max_tokens", None),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens", None),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -0.5}, 400, "temperature", None),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p", None),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 1.5}, 400, "top_p", None),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 0}, 400, "n", None),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": 50}, 400, "logprobs", None),
    ("/v1/completions", {"model": "tiny", "prompt": LONG_PROMPT, "max_tokens": 16}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": LONG_PROMPT + [5] * 8}, 400, "prompt", "maximum context length"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 99999]}, 400, "prompt", "vocabulary"),
    ("/v1/completions", {"model": "tiny", "prompt": []}, 400, "prompt", None),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", None),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt", None),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop_token_ids": [100000]}, 400, None, "stop_token_ids"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens", None),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias", None),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options", None),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "guided_regex": "[a-z"}, 400, "guided_regex", "regex"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"content": "no role"}]}, 400, None, "role"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_completion_tokens": MAX_MODEL_LEN}, 400,
     "max_completion_tokens", "max_completion_tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "response_format": {"type": "json_schema"}}, 400,
     "response_format.json_schema.schema", "schema"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "guided_json": {"type": "object"},
                              "guided_regex": "a+"}, 400, "guided_regex", "guided_json and guided_regex"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, 400, "tools",
     "--enable-auto-tool-choice"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "continue_final_message": True}, 400,
     "continue_final_message", None),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages", "image_url"),
    ("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "chat_template": "{{ raise_exception('no') }}"},
     400, "messages", "no"),
    ("/v1/nothing-here", {}, 404, None, None),
]


@pytest.mark.parametrize("route, body, status, param, text", BAD_REQUESTS,
                         ids=[f"{i}-{r[0].rsplit('/', 1)[-1]}" for i, r in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_an_openai_error(http, route, body, status, param, text):
    assert_error(http.post(route, json=body), status, param, text)
    if "stream_options" not in body:  # the same refusal before a stream starts
        assert_error(http.post(route, json={**body, "stream": True}), status, param, text)


def test_malformed_json_then_the_server_still_serves(http, client):
    response = http.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                         headers={"Content-Type": "application/json"})
    assert_error(response, 400, text="JSON")
    assert_error(http.post("/v1/completions", content=b"[1, 2]", headers={"Content-Type": "application/json"}), 400)
    assert client.completions.create(model="tiny", prompt="still here", max_tokens=3).choices[0].text is not None


def test_allowed_tool_choice_none_and_text_format(client):
    out = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, tool_choice="none",
                                         response_format={"type": "text"}, user="someone")
    assert out.choices[0].message.content is not None


def test_engine_failure_fails_in_flight_requests_and_recovers(client, http, engine, monkeypatch):
    real_step = engine.engine.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kernel failure")
        return real_step()

    monkeypatch.setattr(engine.engine, "step", failing_step)
    error = assert_error(http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 20,
                                                             "ignore_eos": True}), 500)
    assert "simulated kernel failure" in error["message"]
    monkeypatch.setattr(engine.engine, "step", real_step)
    wait_for(lambda: engine_idle(http), "the failed request to be freed")
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=3).usage.completion_tokens >= 1


# -- concurrency, disconnects, metrics ---------------------------------------------------------


def test_32_concurrent_streams_match_sequential_greedy(base_url, client, http):
    prompts = [f"Request {i}: the quick brown fox number {i * 7}" for i in range(32)]
    kwargs = dict(model="tiny", max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    one_at_a_time = [client.completions.create(prompt=p, **kwargs).choices[0].text for p in prompts]

    async def stream_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0) as aclient:
            async def one(prompt: str) -> str:
                stream = await aclient.completions.create(prompt=prompt, stream=True, **kwargs)
                return "".join([c.choices[0].text async for c in stream if c.choices])

            return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(stream_all()) == one_at_a_time
    m = metrics(http)
    assert m["pagedllm:kv_cache_usage_perc"] == 0
    assert m["pagedllm:num_requests_running"] == 0 and m["pagedllm:num_requests_waiting"] == 0


def _num_finished(http) -> float:
    return sum(v for k, v in metrics(http).items() if k.startswith("pagedllm:request_success_total"))


def test_streaming_client_disconnect_aborts_its_request(http, client):
    wait_for(lambda: engine_idle(http), "an idle engine")
    finished_before = _num_finished(http)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # generation has started
    wait_for(lambda: engine_idle(http), "the abandoned request to be aborted")
    assert _num_finished(http) == finished_before  # aborted, not run to the end
    assert client.completions.create(model="tiny", prompt="next", max_tokens=3).choices[0].finish_reason


def test_non_streaming_client_disconnect_aborts_its_request(base_url, http, client):
    wait_for(lambda: engine_idle(http), "an idle engine")
    finished_before = _num_finished(http)
    prompts = ["a b c d"] * 64  # far more work than fits in the client's timeout, even on an idle machine
    body = {"model": "tiny", "prompt": prompts, "max_tokens": MAX_MODEL_LEN - 16, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                   timeout=httpx.Timeout(60, read=0.3))
    wait_for(lambda: engine_idle(http), "the abandoned requests to be aborted")
    assert _num_finished(http) == finished_before
    assert client.completions.create(model="tiny", prompt="next", max_tokens=3).choices[0].finish_reason


def test_metrics_count_tokens_latencies_and_prefix_hits(http, client):
    before = metrics(http)
    prompt = "Paged attention keeps the key and value cache in fixed-size blocks. " * 2
    for _ in range(2):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=5, temperature=0,
                                        extra_body={"ignore_eos": True})
    after = metrics(http)

    def delta(name: str) -> float:
        return after[name] - before.get(name, 0.0)

    assert delta("pagedllm:prompt_tokens_total") == 2 * out.usage.prompt_tokens
    assert delta("pagedllm:generation_tokens_total") == 10
    assert delta("pagedllm:prefix_cache_queries_total") >= 2 * out.usage.prompt_tokens - 2
    assert delta("pagedllm:prefix_cache_hits_total") >= out.usage.prompt_tokens // 2  # the second run reuses blocks
    assert delta("pagedllm:time_to_first_token_seconds_count") == 2
    assert delta("pagedllm:e2e_request_latency_seconds_count") == 2
    assert delta("pagedllm:inter_token_latency_seconds_count") == 8
    assert delta("pagedllm:request_success_total{finished_reason=length}") == 2
    for name in ("pagedllm:num_requests_running", "pagedllm:num_requests_waiting", "pagedllm:kv_cache_usage_perc",
                 "pagedllm:num_preemptions_total"):
        assert name in after


# -- overload --------------------------------------------------------------------------------


def test_overload_is_503_with_retry_after(model_dir, monkeypatch):
    engine = AsyncLLMEngine.from_options(model=str(model_dir), num_kv_blocks=64, max_model_len=MAX_MODEL_LEN,
                                         max_num_seqs=1, max_waiting_requests=1)
    step = engine.engine.step

    def slow_step():  # the tiny model is too quick for requests to queue up otherwise
        time.sleep(0.02)
        return step()

    monkeypatch.setattr(engine.engine, "step", slow_step)
    body = {"model": str(model_dir), "prompt": "hello", "max_tokens": MAX_MODEL_LEN - 8, "ignore_eos": True,
            "stream": True}
    try:
        with running_server(engine) as url, httpx.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as running:
                lines = running.iter_lines()  # (dropping this iterator would close the connection)
                next(lines)  # the first request runs (max_num_seqs=1) ...
                waiting = threading.Thread(
                    target=lambda: httpx.post(f"{url}/v1/completions", json={**body, "stream": False}, timeout=60))
                waiting.start()  # ... the second waits ...
                wait_for(lambda: metrics(http)["pagedllm:num_requests_waiting"] == 1, "a waiting request")
                rejected = http.post("/v1/completions", json=body)  # ... and the third is turned away
                error = assert_error(rejected, 503)
                assert rejected.headers["Retry-After"] == "1" and error["code"] == "engine_overloaded"
            waiting.join(60)
            wait_for(lambda: engine_idle(http), "an idle engine")
            assert http.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2}).status_code == 200
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_embedded_model_chat_through_the_server():
    engine = AsyncLLMEngine.from_options(max_model_len=1024, kv_cache_memory="256MiB")
    try:
        with running_server(engine) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            model = client.models.list().data[0].id
            out = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=32, temperature=0,
            )
            assert "Paris" in out.choices[0].message.content
            assert out.choices[0].finish_reason in ("stop", "length")
    finally:
        engine.shutdown()
