"""Structured outputs, tool calling and reasoning through the server, driven by the official `openai` client.

The tiny random model says nothing useful, so whatever valid output it produces is the
constraint's doing: a good test of guided decoding. Tool calls and reasoning under
tool_choice "auto" are what the model chooses to write, so there a regex constraint
scripts the model's text and the server's parsers must read it; the streaming assembly
is also unit-tested with scripted deltas.
"""

from __future__ import annotations

import json
import random
import re

import httpx
import jsonschema
import openai
import pytest
from test_server import assert_error, running_server

from pagedllm.core.async_engine import AsyncLLMEngine
from pagedllm.core.parsers import DeltaMessage, accumulate_deltas
from pagedllm.entrypoints.openai.api_server import build_app
from pagedllm.entrypoints.openai.message_parser import MessageParser
from pagedllm.plugins.parsers.hermes import HermesToolParser
from pagedllm.plugins.parsers.reasoning import (
    DeepSeekR1ReasoningParser,
    Qwen3ReasoningParser,
)
from pagedllm.testing.tiny import make_tiny_model

MAX_MODEL_LEN = 256
#: Free JSON strings are avoided: xgrammar's JSON grammar lets a random model write UTF-8-encoded
#: surrogates (bytes ED A0..BF ..), which are not valid UTF-8 and decode to U+FFFD (a backend bug).
NAME = {"type": "string", "pattern": "^[a-z]{1,6}$"}
MESSAGES = [{"role": "user", "content": "Answer in JSON"}]

SCHEMAS = {
    "flat_enums": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "string", "enum": ["S", "M", "L"]},
                       "ok": {"type": "boolean"}},
        "required": ["color", "size", "ok"],
    },
    "nested_arrays": {
        "type": "object",
        "properties": {
            "user": {"type": "object", "properties": {"name": NAME,
                                                       "roles": {"type": "array", "items": {"enum": ["admin", "dev"]},
                                                                 "maxItems": 3}},
                     "required": ["name", "roles"]},
            "points": {"type": "array", "items": {"type": "object",
                                                  "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                                 "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                                                  "required": ["x", "y"]}, "minItems": 1, "maxItems": 2},
        },
        "required": ["user", "points"],
    },
    "numeric_ranges": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 65},
                       "score": {"type": "integer", "minimum": -5, "maximum": 5},
                       "count": {"type": "integer", "exclusiveMinimum": 0, "maximum": 1000}},
        "required": ["age", "score", "count"],
    },
    "required_and_optional": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}, "note": NAME,
                       "flag": {"type": "boolean"}},
        "required": ["id", "flag"],
        "additionalProperties": False,
    },
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": NAME,
                                         "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"]}}},
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def literal(text: str) -> str:
    """``text`` as a regex matching itself (xgrammar does not know Python's escaped spaces)."""
    return re.escape(text).replace("\\ ", " ")


#: The model's text, scripted by a regex: a Hermes call the server's tool parser must find.
HERMES_CALL_REGEX = literal('<tool_call>{"name": "get_weather", "arguments": {"city": "') + "[a-z]{1,6}" + \
    literal('", "unit": "celsius"}}</tool_call>')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-structured"), "llama", vocab_size=400)


def start_engine(model_dir, **options) -> AsyncLLMEngine:
    return AsyncLLMEngine.from_options(model=str(model_dir), block_size=4, num_kv_blocks=2048,
                                       max_model_len=MAX_MODEL_LEN, max_num_batched_tokens=256,
                                       served_model_name=["tiny"], **options)


@pytest.fixture(scope="module")
def engine(model_dir):
    engine = start_engine(model_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def base_url(engine):
    with running_server(engine) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(base_url):
    with httpx.Client(base_url=base_url, timeout=120) as http:
        yield http


@pytest.fixture(scope="module")
def parsing_client(model_dir):
    """A server with a reasoning parser (qwen3) and auto tool choice read by the hermes parser."""
    engine = start_engine(model_dir, reasoning_parser="qwen3")
    try:
        with running_server(engine, enable_auto_tool_choice=True, tool_call_parser="hermes") as url:
            yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    finally:
        engine.shutdown()


def chat(client, **kwargs):
    return client.chat.completions.create(model="tiny", messages=MESSAGES, **{"max_tokens": 200, **kwargs})


def stream_chat(client, **kwargs) -> dict[int, dict]:
    """Per choice index: the content, reasoning_content, tool calls and finish_reason a client assembles."""
    choices: dict[int, dict] = {}
    for chunk in chat(client, stream=True, **kwargs):
        for c in chunk.choices:
            out = choices.setdefault(c.index, {"content": "", "reasoning_content": "", "tool_calls": {},
                                               "finish_reason": None})
            out["content"] += c.delta.content or ""
            out["reasoning_content"] += getattr(c.delta, "reasoning_content", None) or ""
            for part in c.delta.tool_calls or []:
                call = out["tool_calls"].setdefault(part.index, {"id": part.id, "name": "", "arguments": ""})
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
            if c.finish_reason is not None:
                assert out["finish_reason"] is None
                out["finish_reason"] = c.finish_reason
    return choices


def assert_valid_calls(calls: list[tuple[str, str, str]], names: set[str]) -> None:
    """(id, name, arguments) of each call: OpenAI-shaped ids, known names, arguments valid against the tool."""
    assert calls
    for call_id, name, arguments in calls:
        assert re.fullmatch(r"call_[A-Za-z0-9]{24}", call_id), call_id
        assert name in names
        jsonschema.validate(json.loads(arguments), TOOL_SCHEMAS[name])


# -- structured outputs ---------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_chat_outputs_validate(client, name):
    out = chat(client, n=3, seed=1, temperature=1.0, response_format={
        "type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}})
    assert len(out.choices) == 3
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


def test_json_schema_stream_concatenates_to_valid_json(client):
    schema = SCHEMAS["nested_arrays"]
    choices = stream_chat(client, n=2, seed=2, response_format={"type": "json_schema",
                                                               "json_schema": {"name": "s", "schema": schema}})
    assert sorted(choices) == [0, 1]
    for out in choices.values():
        assert out["finish_reason"] == "stop"
        jsonschema.validate(json.loads(out["content"]), schema)


def test_json_object_parses(client):
    out = chat(client, seed=3, max_tokens=MAX_MODEL_LEN - 32, response_format={"type": "json_object"},
               extra_body={"guided_decoding_backend": "xgrammar"})
    choice = out.choices[0]
    if choice.finish_reason == "stop":  # an open object may run past max_tokens
        assert isinstance(json.loads(choice.message.content), dict)
    else:
        assert choice.message.content.startswith("{")


def test_completions_guided_forms(client):
    regex = r"[a-c]{2}-[0-9]{1,3}"
    out = client.completions.create(model="tiny", prompt="Code:", max_tokens=20, n=3, seed=4,
                                    extra_body={"guided_regex": regex})
    assert all(re.fullmatch(regex, c.text) for c in out.choices), [c.text for c in out.choices]
    choices = ["alpha", "beta gamma", "δ"]
    out = client.completions.create(model="tiny", prompt="Pick:", max_tokens=20, n=4, seed=5,
                                    extra_body={"structured_outputs": {"choice": choices}})
    assert all(c.text in choices for c in out.choices)
    schema = SCHEMAS["numeric_ranges"]
    out = client.completions.create(model="tiny", prompt="JSON:", max_tokens=60, seed=6,
                                    extra_body={"response_format": {"type": "json_schema",
                                                                    "json_schema": {"name": "r", "schema": schema}}})
    jsonschema.validate(json.loads(out.choices[0].text), schema)
    stream = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=40, seed=7, stream=True,
                                       extra_body={"guided_json": schema})
    texts: dict[int, str] = {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1]
    for text in texts.values():
        jsonschema.validate(json.loads(text), schema)


def test_regex_choice_and_grammar_in_chat(client):
    regex = r"(yes|no), [0-9]{2}"
    for choice in chat(client, n=3, seed=8, extra_body={"guided_regex": regex}).choices:
        assert re.fullmatch(regex, choice.message.content)
    out = chat(client, n=4, seed=9, extra_body={"guided_choice": ["left", "right"]})
    assert {c.message.content for c in out.choices} <= {"left", "right"}
    grammar = 'root ::= expr\nexpr ::= number (("+" | "*") number){0,3}\nnumber ::= [1-9] [0-9]{0,2}\n'
    for stream in (False, True):
        if stream:
            texts = [c["content"] for c in stream_chat(client, n=2, seed=10, extra_body={"guided_grammar": grammar}).values()]
        else:
            texts = [c.message.content for c in chat(client, n=2, seed=10, extra_body={"guided_grammar": grammar}).choices]
        for text in texts:
            assert re.fullmatch(r"[1-9][0-9]{0,2}([+*][1-9][0-9]{0,2}){0,3}", text), text
            eval(text)  # digits and + * only (checked above): the expression parses


def test_stop_strings_cut_guided_output(client):
    out = chat(client, n=2, seed=11, stop=["-"], extra_body={"guided_regex": r"[a-z]{3}-[0-9]{3}"})
    for choice in out.choices:
        assert re.fullmatch(r"[a-z]{3}", choice.message.content)
        assert choice.finish_reason == "stop"


@pytest.mark.parametrize("body, param, text", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
     "response_format", "Unsupported type"),
    ({"guided_regex": "a(b"}, "guided_regex", "regex cannot be compiled"),
    ({"guided_grammar": "root ::= missing_rule"}, "guided_grammar", "grammar cannot be compiled"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs", "exactly one of"),
    ({"structured_outputs": {"choice": ["a"], "backend": "no_such_backend"}}, "structured_outputs", "no_such_backend"),
    ({"structured_outputs": {"choice": ["a"], "whatever": 1}}, "structured_outputs", "whatever"),
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice", "one structured-output"),
])
def test_bad_constraint_is_a_400_and_the_next_request_succeeds(http, client, body, param, text):
    for stream in (False, True):
        response = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "stream": stream, **body})
        assert_error(response, 400, param, text)
    assert chat(client, max_tokens=3, extra_body={"guided_choice": ["ok"]}).choices[0].message.content == "ok"


def test_compile_failure_after_acceptance_is_an_error(http, client, engine, monkeypatch):
    def broken_compile(spec):
        raise RuntimeError("out of grammar memory")

    monkeypatch.setattr(engine.engine.structured_outputs.backend(), "compile", broken_compile)
    body = {"model": "tiny", "messages": MESSAGES, "guided_regex": "q{1,4}z"}  # not compiled before: not cached
    assert_error(http.post("/v1/chat/completions", json=body), 400, "guided_regex", "out of grammar memory")
    events = http.post("/v1/completions", json={"model": "tiny", "prompt": "x", "guided_regex": "q{1,4}z",
                                                "stream": True}).text
    assert "out of grammar memory" in events and events.rstrip().endswith("data: [DONE]")
    monkeypatch.undo()
    assert re.fullmatch("q{1,4}z", chat(client, extra_body={"guided_regex": "q{1,4}z"}).choices[0].message.content)


# -- tool calling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice, parallel", [
    ({"type": "function", "function": {"name": "add"}}, None),
    ("required", False),
    ("required", None),
])
def test_forced_tool_choice_returns_schema_valid_calls(client, tool_choice, parallel, stream):
    kwargs = {"tools": TOOLS, "tool_choice": tool_choice, "n": 3, "seed": 12, "max_tokens": 200}
    if parallel is not None:
        kwargs["parallel_tool_calls"] = parallel
    if stream:
        results = [(c["finish_reason"], c["content"] or None,
                    [(t["id"], t["name"], t["arguments"]) for _, t in sorted(c["tool_calls"].items())])
                   for _, c in sorted(stream_chat(client, **kwargs).items())]
    else:
        results = [(c.finish_reason, c.message.content,
                    [(t.id, t.function.name, t.function.arguments) for t in c.message.tool_calls])
                   for c in chat(client, **kwargs).choices]
    assert len(results) == 3
    names = {"add"} if isinstance(tool_choice, dict) else set(TOOL_SCHEMAS)
    for finish_reason, content, calls in results:
        assert finish_reason == "tool_calls"
        assert_valid_calls(calls, names)
        if parallel is not None or isinstance(tool_choice, dict):
            assert len(calls) == 1 and content is None


def test_tool_choice_errors(http):
    base = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS}
    assert_error(http.post("/v1/chat/completions", json={**base, "tool_choice": "auto"}), 400, "tool_choice",
                 "--enable-auto-tool-choice")
    assert_error(http.post("/v1/chat/completions", json={**base, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}), 400, "tool_choice", "not in tools: get_weather, add")
    assert_error(http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                                         "tool_choice": "required"}), 400, "tools", "non-empty tools")
    assert_error(http.post("/v1/chat/completions", json={**base, "tool_choice": "required",
                                                         "guided_regex": "a"}), 400, "tool_choice", "guided_regex")


def test_tool_choice_none_leaves_the_model_free(client):
    out = chat(client, tools=TOOLS, tool_choice="none", max_tokens=4, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length" and not out.choices[0].message.tool_calls


def test_chat_template_sees_tools_and_tool_call_arguments(client, model_dir):
    from transformers import AutoTokenizer

    template = ("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                "{% for m in messages %}{{ m.role }}:{{ m.content or '' }}"
                "{% for c in m.tool_calls or [] %}{{ c.function.name }}({{ c.function.arguments.a }}){% endfor %}"
                "{% endfor %}")
    messages = [{"role": "user", "content": "add"},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                      "function": {"name": "add", "arguments": '{"a": 7, "b": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "8"}]
    out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none",
                                         max_tokens=1, extra_body={"chat_template": template})
    expected = "[get_weather][add]user:addassistant:add(7)tool:8"
    assert out.usage.prompt_tokens == len(AutoTokenizer.from_pretrained(model_dir)(expected).input_ids)


def test_auto_tool_choice_reads_the_models_calls(parsing_client):
    """The regex scripts the model's text; the hermes parser finds the call, streaming and not."""
    out = chat(parsing_client, tools=TOOLS, n=2, seed=13, extra_body={"guided_regex": HERMES_CALL_REGEX})
    for choice in out.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert_valid_calls([(call.id, call.function.name, call.function.arguments)], {"get_weather"})
    streamed = stream_chat(parsing_client, tools=TOOLS, tool_choice="auto", seed=13,
                           extra_body={"guided_regex": HERMES_CALL_REGEX})[0]
    assert streamed["finish_reason"] == "tool_calls" and streamed["content"] == ""
    assert [t["arguments"] for t in streamed["tool_calls"].values()] == [out.choices[0].message.tool_calls[0].function.arguments]


def test_auto_tool_choice_malformed_call_is_content(parsing_client):
    regex = literal('Hi <tool_call>{"name": ') + "[a-z]{1,5}" + literal("}</tool_call>")
    for stream in (False, True):
        if stream:
            out = stream_chat(parsing_client, tools=TOOLS, seed=14, extra_body={"guided_regex": regex})[0]
            content, calls, finish_reason = out["content"], out["tool_calls"], out["finish_reason"]
        else:
            choice = chat(parsing_client, tools=TOOLS, seed=14, extra_body={"guided_regex": regex}).choices[0]
            content, calls, finish_reason = choice.message.content, choice.message.tool_calls, choice.finish_reason
        assert re.fullmatch(regex, content) and not calls and finish_reason == "stop"


# -- reasoning -----------------------------------------------------------------------------------------


def test_reasoning_content_is_split(parsing_client):
    regex = literal("<think>") + "[a-z ]{3,12}" + literal("</think>") + "[a-z]{2,6}"
    out = chat(parsing_client, seed=15, extra_body={"guided_regex": regex})
    message = out.choices[0].message
    assert re.fullmatch("[a-z ]{3,12}", message.reasoning_content) and re.fullmatch("[a-z]{2,6}", message.content)
    streamed = stream_chat(parsing_client, seed=15, extra_body={"guided_regex": regex})[0]
    assert (streamed["reasoning_content"], streamed["content"]) == (message.reasoning_content, message.content)


def test_reasoning_then_tool_call(parsing_client):
    regex = literal("<think>") + "[a-z]{1,6}" + literal("</think>") + HERMES_CALL_REGEX
    choice = chat(parsing_client, tools=TOOLS, seed=16, extra_body={"guided_regex": regex}).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert re.fullmatch("[a-z]{1,6}", choice.message.reasoning_content)
    [call] = choice.message.tool_calls
    assert_valid_calls([(call.id, call.function.name, call.function.arguments)], {"get_weather"})
    streamed = stream_chat(parsing_client, tools=TOOLS, seed=16, extra_body={"guided_regex": regex})[0]
    assert streamed["reasoning_content"] == choice.message.reasoning_content
    assert [(t["name"], t["arguments"]) for t in streamed["tool_calls"].values()] == [
        (call.function.name, call.function.arguments)]


def test_free_output_with_parsers_returns_the_fields(parsing_client):
    out = chat(parsing_client, max_tokens=12, extra_body={"ignore_eos": True})
    message = out.choices[0].message
    assert out.choices[0].finish_reason == "length"
    assert (message.content or "") + (message.reasoning_content or "") != "" or message.tool_calls


# -- the message assembly, with scripted text ------------------------------------------------------------

SCRIPTS = [
    ("qwen3", ('<think>Paris is in France.</think>\n<tool_call>{"name": "get_weather", "arguments": '
              '{"city": "Paris", "unit": "celsius"}}</tool_call>')),
    ("qwen3", ('No thinking, just <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
              '<tool_call>{"name": "add", "arguments": {"a": 3, "b": 4}}</tool_call>')),
    ("qwen3", "<think>still thinking <tool_call>"),
    ("deepseek_r1", "reasoning without an opening tag</think>The answer <tool_call>{\"name\": f}</tool_call>"),
    ("deepseek_r1", "<think>é 🙂</think>Plain answer, ünïcode."),
    (None, "<tool_call>{\"name\": \"add\", \"arguments\": {\"a\": \"</tool_call>\"}}</tool_call> tail"),
]
REASONING = {"qwen3": Qwen3ReasoningParser, "deepseek_r1": DeepSeekR1ReasoningParser, None: None}


@pytest.mark.parametrize("reasoning, text", SCRIPTS, ids=[f"{i}-{r}" for i, (r, _) in enumerate(SCRIPTS)])
@pytest.mark.parametrize("with_tools", [True, False])
def test_streamed_message_equals_the_finished_one(reasoning, text, with_tools):
    def parser() -> MessageParser:
        reasoning_cls = REASONING[reasoning]
        return MessageParser(reasoning_cls() if reasoning_cls else None, HermesToolParser() if with_tools else None)

    finished = parser()
    message = finished.parse(text)
    rng = random.Random(len(text))
    for _ in range(5):
        streaming, deltas, end = parser(), [], 0
        while end < len(text):
            end = min(len(text), end + rng.randint(1, 6))
            deltas.append(streaming.feed(text[:end], finished=False))
        deltas.append(streaming.feed(text, finished=True))
        content, reasoning_content, calls = accumulate_deltas(deltas)
        assert (content or None, reasoning_content) == (message.content or None, message.reasoning_content)
        assert [(c.function.name, c.function.arguments) for c in calls] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in message.tool_calls]
        assert streaming.tools_called == finished.tools_called == bool(message.tool_calls)
        assert all(c.id.startswith("call_") for c in calls)


def test_message_parser_splits_reasoning_and_calls():
    message = MessageParser(Qwen3ReasoningParser(), HermesToolParser()).parse(SCRIPTS[0][1])
    assert message.reasoning_content == "Paris is in France." and message.content is None
    assert [c["function"]["name"] for c in message.tool_calls] == ["get_weather"]
    assert MessageParser().parse("as is").content == "as is"
    delta = MessageParser().feed("abc", finished=False)
    assert delta == DeltaMessage(content="abc")


# -- server start-up ---------------------------------------------------------------------------------------


def test_unknown_tool_parser_fails_at_start_up_listing_the_known_ones(engine):
    from pagedllm.core.config import ServerConfig

    with pytest.raises(ValueError, match="hermes") as info:
        build_app(engine, ServerConfig(enable_auto_tool_choice=True, tool_call_parser="nope"))
    assert "nope" in str(info.value)
    with pytest.raises(ValueError, match="tool_call_parser"):
        build_app(engine, ServerConfig(enable_auto_tool_choice=True))


@pytest.mark.slow
def test_embedded_model_json_schema_chat_through_the_server():
    engine = AsyncLLMEngine.from_options(max_model_len=1024, kv_cache_memory="256MiB")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "country": {"type": "string", "maxLength": 20},
                                               "population_millions": {"type": "integer", "minimum": 0, "maximum": 50}},
              "required": ["city", "country", "population_millions"], "additionalProperties": False}
    try:
        with running_server(engine) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            model = client.models.list().data[0].id
            out = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Describe Paris as JSON with city, country "
                                                                   "and population_millions."}],
                max_tokens=80, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
            )
            assert out.choices[0].finish_reason == "stop"
            data = json.loads(out.choices[0].message.content)
            jsonschema.validate(data, schema)
            assert data["city"] == "Paris"
    finally:
        engine.shutdown()
