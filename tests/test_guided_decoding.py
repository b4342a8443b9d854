"""Guided decoding on a tiny random model: the mask alone must make every output valid.

A random model has no idea of JSON or of the regex, so any output that validates does
so because of the token masks. Outputs are checked with external tools: the
``jsonschema`` validator, ``re.fullmatch`` and Python's own parser.
"""

from __future__ import annotations

import ast
import json
import re
import threading

import jsonschema
import pytest

from pagedllm import LLM, SamplingParams
from pagedllm.core.guided import GUIDED_KEY
from pagedllm.core.hookspecs import hookimpl
from pagedllm.core.sampling_params import StructuredOutputsParams
from pagedllm.testing.plugin import make_plugin_manager
from pagedllm.testing.tiny import make_tiny_model

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
            "user": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                       "roles": {"type": "array", "items": {"enum": ["admin", "dev"]},
                                                                 "maxItems": 3}},
                     "required": ["name", "roles"]},
            "points": {"type": "array", "items": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
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
        "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 99}, "note": {"type": "string", "maxLength": 5},
                       "flag": {"type": "boolean"}},
        "required": ["id", "flag"],
        "additionalProperties": False,
    },
}
EXPRESSION_GRAMMAR = r"""
root ::= expr
expr ::= term (("+" | "-" | "*") term){0,3}
term ::= number | "(" expr ")"
number ::= [1-9] [0-9]{0,2}
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-guided"), "llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), block_size=4, num_kv_blocks=1024, max_model_len=512, max_num_batched_tokens=128)


def guided(seed: int, max_tokens: int = 256, **constraint) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, structured_outputs=constraint)


def texts(outputs) -> list[str]:
    return [c.text for o in outputs for c in o.outputs]


def test_tokenizer_is_smaller_than_the_model_vocabulary(llm):
    """The tiny model has 512 logits for a 400-token tokenizer: the padding ids must be masked too."""
    assert len(llm.get_tokenizer()) < llm.engine.vocab_size


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate(llm, name):
    schema = SCHEMAS[name]
    outputs = llm.generate(["The quick brown fox"] * 6, [guided(seed, json=schema) for seed in range(6)])
    for output in outputs:
        completion = output.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)
        assert all(t < len(llm.get_tokenizer()) for t in completion.token_ids)


def test_json_object_and_schema_as_text(llm):
    outputs = llm.generate(["{", "Hi"], [guided(0, json_object=True, max_tokens=400),
                                          guided(1, json=json.dumps(SCHEMAS["flat_enums"]))])
    first, second = texts(outputs)
    if outputs[0].outputs[0].finish_reason == "stop":  # an open object may run past max_tokens
        assert isinstance(json.loads(first), dict)
    else:
        assert first.startswith("{")
    jsonschema.validate(json.loads(second), SCHEMAS["flat_enums"])


def test_regex_outputs_fully_match(llm):
    pattern = r"(\d{3}-[a-z]{2,4}|[A-Z][a-z]{1,3} \d)"
    outputs = llm.generate(["Code:"] * 8, [guided(seed, regex=pattern) for seed in range(8)])
    for text in texts(outputs):
        assert re.fullmatch(pattern, text), text


def test_choice_outputs_are_exactly_one_choice(llm):
    choices = ["yes", "no", 'maybe "so"', "naïve 🙂", "yes please"]
    outputs = llm.generate(["Answer:"] * 10, [guided(seed, choice=choices) for seed in range(10)])
    results = texts(outputs)
    assert all(text in choices for text in results), results
    assert len(set(results)) > 1  # the mask chooses nothing: the random model does


def test_ebnf_grammar_outputs_parse(llm):
    outputs = llm.generate(["1+"] * 8, [guided(seed, grammar=EXPRESSION_GRAMMAR) for seed in range(8)])
    for text in texts(outputs):
        tree = ast.parse(text, mode="eval")  # Python's own parser: the grammar is a subset of its expressions
        allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult)
        assert all(isinstance(node, allowed) for node in ast.walk(tree)), text


def test_guided_and_free_requests_share_steps(llm, monkeypatch):
    engine = llm.engine
    mixed_steps = []
    sample = engine.sampler.sample

    def recording_sample(logits, requests):
        kinds = {GUIDED_KEY in r.extra for r in requests}
        mixed_steps.append(kinds == {True, False})
        return sample(logits, requests)

    monkeypatch.setattr(engine.sampler, "sample", recording_sample)
    free = SamplingParams(temperature=1.0, seed=5, max_tokens=30, ignore_eos=True)
    params = [guided(seed, json=SCHEMAS["numeric_ranges"]) for seed in range(3)] + [free] * 3
    outputs = llm.generate(["Mixed batch"] * 6, params)
    assert any(mixed_steps)
    for output in outputs[:3]:
        jsonschema.validate(json.loads(output.outputs[0].text), SCHEMAS["numeric_ranges"])
    assert all(len(o.outputs[0].token_ids) == 30 for o in outputs[3:])
    # The free requests are sampled exactly as they would be alone (same seed, same tokens).
    alone = llm.generate(["Mixed batch"], free)[0].outputs[0].token_ids
    assert outputs[3].outputs[0].token_ids == alone


def test_n_samples_each_follow_the_constraint(llm):
    pattern = r"[a-d]{2,6}-\d{2}"
    params = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=32, structured_outputs={"regex": pattern})
    [output] = llm.generate(["Samples"], params)
    results = [c.text for c in output.outputs]
    assert len(results) == 4 and all(re.fullmatch(pattern, t) for t in results), results
    assert len(set(results)) > 1


def test_same_constraint_compiles_once(llm):
    backend = llm.engine.structured_outputs.backend()
    schema = {"type": "object", "properties": {"k": {"enum": [1, 2, 3]}, "v": {"type": "boolean"}}, "required": ["k", "v"]}
    reordered = {"required": ["k", "v"], "properties": {"v": {"type": "boolean"}, "k": {"enum": [1, 2, 3]}}, "type": "object"}
    before = backend.num_compiles
    outputs = llm.generate(["a", "b", "c"], [guided(0, json=schema), guided(1, json=reordered), guided(2, json=json.dumps(schema))])
    assert backend.num_compiles == before + 1
    for text in texts(outputs):
        jsonschema.validate(json.loads(text), schema)
    llm.generate(["d"], guided(3, json=schema))
    assert backend.num_compiles == before + 1


@pytest.mark.parametrize("constraint, message", [
    ({"json": {"type": "objectx"}}, "structured_outputs.json cannot be compiled: Unsupported type"),
    ({"regex": "a(b"}, "structured_outputs.regex cannot be compiled"),
    ({"grammar": "root ::= missing_rule"}, "structured_outputs.grammar cannot be compiled"),
    ({"choice": ["a"], "backend": "no_such_backend"}, "no_such_backend"),
])
def test_bad_constraint_is_a_value_error_and_others_are_unaffected(llm, constraint, message):
    engine = llm.engine
    engine.add_request("good", "Hello", guided(1, regex=r"[xyz]{3}"))
    with pytest.raises(ValueError, match=re.escape(message)):
        engine.add_request("bad", "Hello", SamplingParams(structured_outputs=constraint))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(finished) == ["good"] and re.fullmatch(r"[xyz]{3}", finished["good"].outputs[0].text)


def test_invalid_structured_outputs_fields_name_the_field():
    with pytest.raises(ValueError, match="exactly one of json, regex, choice"):
        SamplingParams(structured_outputs={"json": {}, "regex": "a"})
    with pytest.raises(ValueError, match="structured_outputs.json is not valid JSON"):
        SamplingParams(structured_outputs={"json": "{not json"})
    with pytest.raises(ValueError, match="structured_outputs.choice"):
        SamplingParams(structured_outputs=StructuredOutputsParams(choice=[]))
    with pytest.raises(ValueError, match="unknown key"):
        SamplingParams(structured_outputs={"jsn": {}})
    old = SamplingParams(guided_decoding=StructuredOutputsParams(regex="a+"))
    assert old.structured_outputs.regex == "a+" and old.guided_decoding is None


def test_compile_runs_off_the_step_path(llm, monkeypatch):
    """While a constraint compiles, other requests keep stepping; the guided one starts after."""
    backend = llm.engine.structured_outputs.backend()
    release = threading.Event()
    compile_ = backend.compile

    def slow_compile(spec):
        assert release.wait(60)
        return compile_(spec)

    monkeypatch.setattr(backend, "compile", slow_compile)
    engine = llm.engine
    engine.add_request("guided", "Hi", guided(0, regex=r"[0-9]{4}"))
    engine.add_request("free", "Hi", SamplingParams(max_tokens=5, ignore_eos=True))
    finished = {}
    while "free" not in finished:
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert "guided" not in finished and engine.has_unfinished_requests()
    release.set()
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert re.fullmatch(r"[0-9]{4}", finished["guided"].outputs[0].text)


def test_failed_compile_ends_only_that_request(llm, monkeypatch):
    backend = llm.engine.structured_outputs.backend()

    def broken_compile(spec):
        raise RuntimeError("out of grammar memory")

    monkeypatch.setattr(backend, "compile", broken_compile)
    engine = llm.engine
    engine.add_request("doomed", "Hi", guided(0, regex=r"q+"))
    engine.add_request("fine", "Hi", SamplingParams(max_tokens=4, ignore_eos=True))
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({o.request_id: o for o in engine.step() if o.finished})
    assert finished["doomed"].outputs[0].finish_reason == "abort"
    assert "out of grammar memory" in finished["doomed"].extra["error"]
    assert len(finished["fine"].outputs[0].token_ids) == 4


def test_stop_strings_end_guided_requests(llm):
    choices = ["alpha beta", "gamma delta"]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=32, stop=[" "], structured_outputs={"choice": choices})
              for s in range(4)]
    for output in llm.generate(["Pick"] * 4, params):
        completion = output.outputs[0]
        assert completion.text in ("alpha", "gamma") and completion.stop_reason == " "


def test_preemption_keeps_outputs_valid(model_dir):
    # 40 blocks of 4 tokens for 8 requests that each want ~45: some must be preempted and recomputed.
    small = LLM(str(model_dir), block_size=4, num_kv_blocks=40, max_model_len=128, max_num_batched_tokens=64,
                enable_prefix_caching=False)
    schema = SCHEMAS["numeric_ranges"]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=80, structured_outputs={"json": schema}) for s in range(8)]
    outputs = small.generate([f"Request number {i} asks for JSON" for i in range(8)], params)
    assert small.engine.scheduler.num_preemptions > 0
    for output in outputs:  # a matcher fed a token twice would reject the rest of the object
        assert output.outputs[0].finish_reason == "stop", output.outputs[0]
        jsonschema.validate(json.loads(output.outputs[0].text), schema)


class _AfterThreeTokens:
    """A reasoning parser for the test: reasoning is the first three output tokens."""

    def __init__(self, tokenizer):
        pass

    def is_reasoning_end(self, output):
        return len(output) >= 3


class _ReasoningPlugin:
    @hookimpl
    def pagedllm_register_reasoning_parsers(self, register):
        register("after_three", _AfterThreeTokens)


def test_constraint_starts_after_reasoning(model_dir):
    plugins = make_plugin_manager([("reasoning", _ReasoningPlugin())], include_entry_points=True)
    llm = LLM(str(model_dir), plugins=plugins, reasoning_parser="after_three", num_kv_blocks=256, max_model_len=256)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, structured_outputs={"regex": r"[0-9]{2}"}) for s in range(6)]
    tokenizer = llm.get_tokenizer()
    free_starts = set()
    for output in llm.generate(["Think first"] * 6, params):
        token_ids = output.outputs[0].token_ids
        assert len(token_ids) >= 4
        assert re.fullmatch(r"[0-9]{2}", tokenizer.decode(token_ids[3:], skip_special_tokens=True))
        free_starts.add(tokenizer.decode(token_ids[:3]))
    assert not all(re.fullmatch(r"[0-9]*", s) for s in free_starts)  # the reasoning tokens were not masked


@pytest.mark.slow
def test_embedded_model_json_and_choice():
    llm = LLM(max_num_batched_tokens=128, max_model_len=1024, kv_cache_memory="256MiB")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "country": {"type": "string", "maxLength": 30},
                                               "population_millions": {"type": "number", "minimum": 0, "maximum": 100}},
              "required": ["city", "country", "population_millions"]}
    messages = [{"role": "user", "content": "Describe Paris as JSON with city, country and population_millions."}]
    params = [SamplingParams(temperature=t, seed=s, max_tokens=120, structured_outputs={"json": schema})
              for t, s in [(0.0, 0), (0.8, 1), (0.8, 2)]]
    for output in llm.chat([messages] * 3, params):
        jsonschema.validate(json.loads(output.outputs[0].text), schema)
    answer = llm.chat([{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
                      SamplingParams(temperature=0.0, max_tokens=8, structured_outputs={"choice": ["yes", "no"]}))
    assert answer[0].outputs[0].text in ("yes", "no")


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 12},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "now"}},
]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_choice_gives_schema_valid_calls(llm, tool_choice):
    from pagedllm.core.parsers import accumulate_deltas
    from pagedllm.core.tool_choice import ForcedToolCallParser, tool_choice_structured_outputs

    spec = tool_choice_structured_outputs(TOOLS, tool_choice)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200, structured_outputs=spec) for s in range(6)]
    schemas = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}
    names, num_stopped = set(), 0
    for output in llm.generate(["Call a tool"] * 6, params):
        text = output.outputs[0].text
        result = ForcedToolCallParser().extract_tool_calls(text)
        assert result.tools_called, text
        if output.outputs[0].finish_reason == "stop":
            num_stopped += 1
            assert result.content is None, text
        else:  # parallel calls may go on until max_tokens: the complete ones are kept
            assert tool_choice == "required" and output.outputs[0].finish_reason == "length"
        for call in result.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            names.add(call.function.name)
        if tool_choice != "required":
            assert [c.function.name for c in result.tool_calls] == ["add"]
        parser, deltas = ForcedToolCallParser(), []
        for end in range(1, len(text) + 1, 3):
            deltas.append(parser.extract_tool_calls_streaming(text[:end - 1], text[:end], text[end - 1:end]))
        deltas.append(parser.extract_tool_calls_streaming(text, text, "", finished=True))
        _, _, streamed = accumulate_deltas(deltas)
        assert [(c.function.name, c.function.arguments) for c in streamed] == [
            (c.function.name, c.function.arguments) for c in result.tool_calls]
    assert num_stopped >= 3
    if tool_choice == "required":
        assert len(names) > 1  # the model picks among the tools


def test_single_forced_call_without_parallel_tool_calls(llm):
    from pagedllm.core.tool_choice import ForcedToolCallParser, tool_choice_structured_outputs

    spec = tool_choice_structured_outputs(TOOLS, "required", parallel_tool_calls=False)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=200, structured_outputs=spec) for s in range(4)]
    for output in llm.generate(["Call one tool"] * 4, params):
        result = ForcedToolCallParser().extract_tool_calls(output.outputs[0].text)
        assert len(result.tool_calls) == 1 and result.content is None


def test_tool_choice_helper_validates_its_input():
    from pagedllm.core.tool_choice import tool_choice_structured_outputs

    assert tool_choice_structured_outputs(TOOLS, "auto") is None and tool_choice_structured_outputs(TOOLS, "none") is None
    with pytest.raises(ValueError, match="not in tools: get_weather, add, now"):
        tool_choice_structured_outputs(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="needs a non-empty tools list"):
        tool_choice_structured_outputs([], "required")
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        tool_choice_structured_outputs([{"type": "function"}], "required")
    with pytest.raises(ValueError, match="tool_choice must be"):
        tool_choice_structured_outputs(TOOLS, "sometimes")


def test_structural_tag_output_reads_as_a_hermes_call(llm):
    from pagedllm.plugins.parsers.hermes import HermesToolParser

    arguments = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["a"]}
    tag = {"type": "structural_tag", "format": {
        "type": "tag", "begin": "<tool_call>", "end": "</tool_call>",
        "content": {"type": "json_schema", "json_schema": {
            "type": "object", "properties": {"name": {"const": "add"}, "arguments": arguments}, "required": ["name", "arguments"]}}}}
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=300, structured_outputs={"structural_tag": tag}) for s in range(4)]
    outputs = [o for o in llm.generate(["Tag"] * 4, params) if o.outputs[0].finish_reason == "stop"]
    assert len(outputs) >= 2  # (the tag's JSON allows free whitespace, which may run to max_tokens)
    for output in outputs:
        result = HermesToolParser(llm.get_tokenizer()).extract_tool_calls(output.outputs[0].text)
        [call] = result.tool_calls
        assert call.function.name == "add" and result.content is None
        jsonschema.validate(json.loads(call.function.arguments), arguments)
