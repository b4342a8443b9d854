"""IncrementalDetokenizer: a request's output token ids turned into streamed text, with stop strings."""

from __future__ import annotations

import codecs
import functools
import logging
import random
import weakref
from collections.abc import Callable, Sequence
from typing import Any

try:
    from tokenizers.decoders import ByteLevel as ByteLevelDecoder
except ImportError:
    ByteLevelDecoder = None
try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21
    DecodeStream = None

logger = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 character
# The prompt tail that seeds decoding: the shortest one of at least _MIN_CONTEXT tokens
# (or the whole prompt) that decodes cleanly, looking no further back than _MAX_CONTEXT.
_MIN_CONTEXT, _MAX_CONTEXT = 4, 24

Decode = Callable[[list[int]], str]


class _WindowDecoder:
    """The classic algorithm: decode a window of ids and emit what the newest ones added.

    The window starts with the tokens of the previous emission (or the prompt tail), so
    a new token decodes with the leading space it has mid-sequence. Text ending in U+FFFD
    is held back: the next token may complete the character.
    """

    def __init__(self, decode: Decode, context_ids: Sequence[int]):
        self._decode = decode
        self._ids = list(context_ids)
        self._read_offset = len(self._ids)  # ids before this were already emitted
        self._prefix_text = decode(self._ids)

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Everything still held back, U+FFFD included: no more tokens will come."""
        return self._emit(final=True) if self._read_offset < len(self._ids) else ""

    def _emit(self, final: bool) -> str:
        text = self._decode(self._ids)
        if not final and (len(text) <= len(self._prefix_text) or text.endswith(_REPLACEMENT)):
            return ""
        delta = text[len(self._prefix_text) :]
        self._ids = self._ids[self._read_offset :]
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids)
        return delta


class _StreamDecoder:
    """tokenizers' own DecodeStream; switches to _WindowDecoder if the stream fails.

    It mirrors the ids the stream holds (the last emitted tokens, then the pending ones)
    so that flush() and the switch can rebuild the same state.
    """

    def __init__(self, backend: Any, decode: Decode, skip_special_tokens: bool, context_ids: list[int]):
        self._backend = backend
        self._decode = decode
        try:
            self._stream = DecodeStream(ids=context_ids, skip_special_tokens=skip_special_tokens)
        except TypeError:  # tokenizers < 0.22 takes no ids: prime the stream by stepping
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            for token_id in context_ids:
                self._stream.step(backend, token_id)
        self._context_ids = context_ids
        self._pending_ids: list[int] = []
        self._window: _WindowDecoder | None = None

    def step(self, token_id: int) -> str:
        if self._window is not None:
            return self._window.step(token_id)
        self._pending_ids.append(token_id)
        try:
            text = self._stream.step(self._backend, token_id)
        except Exception as e:  # "Invalid prefix encountered" when decoding is not monotonic
            logger.warning("DecodeStream failed (%s); continuing with window decoding", e)
            return self._switch_to_window()
        if text is None:
            return ""
        self._context_ids, self._pending_ids = self._pending_ids, []
        return text

    def flush(self) -> str:
        text = self._switch_to_window() if self._window is None else ""
        return text + self._window.flush()

    def _switch_to_window(self) -> str:
        self._window = _WindowDecoder(self._decode, self._context_ids)
        return "".join(self._window.step(token_id) for token_id in self._pending_ids)


class _ByteLevelDecoder:
    """For byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM): each token is a fixed byte
    string, so decoding is a table lookup and an incremental UTF-8 decode.

    Gives the text ``tokenizers`` gives (its ByteLevel decoder joins the tokens' bytes and
    decodes them lossily, as ``errors="replace"`` does) at ~0.5 us a token, stop-string
    bookkeeping included, against ~4 us through DecodeStream; an incomplete character is held
    back until its last byte arrives.
    """

    def __init__(self, pieces: list[bytes]):
        self._pieces = pieces
        self._pending = b""  # the bytes of an incomplete character

    def step(self, token_id: int) -> str:
        pieces = self._pieces
        data = self._pending + pieces[token_id] if 0 <= token_id < len(pieces) else self._pending
        # codecs.utf_8_decode with final=False stops before an incomplete trailing character
        text, consumed = codecs.utf_8_decode(data, "replace", False)
        self._pending = data[consumed:]
        return text

    def flush(self) -> str:
        text = codecs.utf_8_decode(self._pending, "replace", True)[0]
        self._pending = b""
        return text


_BYTE_PIECES: weakref.WeakKeyDictionary[Any, dict[bool, list[bytes] | None]] = weakref.WeakKeyDictionary()


def _byte_level_pieces(tokenizer: Any, backend: Any, skip_special_tokens: bool) -> list[bytes] | None:
    """Every token id's bytes when ``backend`` decodes with a plain ByteLevel decoder, else None.

    Built once per tokenizer (~60 ms for 49k tokens) and checked against ``backend.decode`` on
    a few sequences that hold every added token; on any difference the caller keeps DecodeStream.
    """
    try:
        cached = _BYTE_PIECES.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: build without caching
        cached = {}
    if skip_special_tokens in cached:
        return cached[skip_special_tokens]
    pieces = None
    if ByteLevelDecoder is not None and isinstance(getattr(backend, "decoder", None), ByteLevelDecoder):
        char_bytes = _byte_level_alphabet()
        added = backend.get_added_tokens_decoder()
        pieces = []
        for token_id in range(backend.get_vocab_size(with_added_tokens=True)):
            token = backend.id_to_token(token_id)
            if token is None or (skip_special_tokens and token_id in added and added[token_id].special):
                pieces.append(b"")
                continue
            try:
                pieces.append(bytes(char_bytes[c] for c in token))
            except KeyError:  # ByteLevel keeps a token with characters outside its alphabet as UTF-8
                pieces.append(token.encode())
        rng = random.Random(0)
        for _ in range(4):
            ids = [rng.randrange(len(pieces)) for _ in range(128)] + list(added)
            rng.shuffle(ids)
            try:
                same = b"".join(pieces[i] for i in ids).decode("utf-8", "replace") == backend.decode(
                    ids, skip_special_tokens=skip_special_tokens)
            except Exception:  # a decoder that rejects some ids: not the plain byte-level one
                same = False
            if not same:
                logger.info("byte-level token table disagrees with the tokenizer's decode; using DecodeStream")
                pieces = None
                break
    cached[skip_special_tokens] = pieces
    return pieces


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: printable bytes stand for themselves, the
    others (space, control bytes, ...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def _prompt_context(decode: Decode, prompt_token_ids: Sequence[int]) -> list[int]:
    """The prompt tail to decode after, so the first output token gets its leading space."""
    num_prompt = len(prompt_token_ids)
    for n in range(min(_MIN_CONTEXT, num_prompt), min(_MAX_CONTEXT, num_prompt) + 1):
        tail = list(prompt_token_ids[num_prompt - n :])
        if n > 0 and _REPLACEMENT not in decode(tail):
            return tail
    return []  # no clean tail (e.g. the prompt ends inside a character): decode from scratch


class IncrementalDetokenizer:
    """Decodes one request's output tokens as they arrive and watches for stop strings.

    Fast tokenizers (with a ``backend_tokenizer``) use ``tokenizers.decoders.DecodeStream``;
    others use the classic window algorithm with ``tokenizer.decode``. Either way the text
    is what ``tokenizer.decode(output_token_ids)`` gives, except that it keeps the leading
    space the first token has after the prompt and applies no ``clean_up_tokenization_spaces``.

    A stop string matches as soon as it is complete in the text: of two stop strings in
    the same new text, the one that ends first wins (the earlier-starting one if both end
    at once), so the outcome does not depend on how the text was split into tokens.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.output_text = ""
        self.stop_str: str | None = None  # the stop string that ended the text, once one has
        self.is_finished = False
        self._num_sent = 0  # characters of output_text handed out by get_delta
        self._max_stop_len = max(map(len, self.stop), default=0)
        backend = getattr(tokenizer, "backend_tokenizer", None)  # a tokenizers.Tokenizer if fast
        decode_kwargs = {"skip_special_tokens": skip_special_tokens}
        if backend is None:  # only slow tokenizers know spaces_between_special_tokens
            decode_kwargs["spaces_between_special_tokens"] = spaces_between_special_tokens
        decoding = tokenizer if backend is None else backend
        decode = functools.partial(decoding.decode, **decode_kwargs)
        self._decode_all = functools.partial(decoding.decode, skip_special_tokens=False)
        pieces = _byte_level_pieces(tokenizer, backend, skip_special_tokens) if backend is not None else None
        if pieces is not None:
            self._decoder: _ByteLevelDecoder | _StreamDecoder | _WindowDecoder = _ByteLevelDecoder(pieces)
        elif backend is not None and DecodeStream is not None:
            context_ids = _prompt_context(decode, prompt_token_ids)
            self._decoder = _StreamDecoder(backend, decode, skip_special_tokens, context_ids)
        else:
            self._decoder = _WindowDecoder(decode, _prompt_context(decode, prompt_token_ids))
        # Fast tokenizers ignore spaces_between_special_tokens; like vLLM, we honour False by
        # emitting a special token that follows another one as its bare text.
        self._bare_special_texts: dict[int, str] = {}
        if not skip_special_tokens and not spaces_between_special_tokens:
            added = getattr(tokenizer, "added_tokens_decoder", {})
            self._bare_special_texts = {i: t.content for i, t in added.items() if t.special}
        self._prev_is_special = False
        self._anchor: tuple[list[int], str] | None = None

    def append_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """``append([token_id], check_stop)``: the engine's one token a step, with less Python."""
        if self._bare_special_texts or self.stop_str is not None or self.is_finished:
            return self.append((token_id,), check_stop)
        text = self._decoder.step(token_id)
        if text:
            if self.stop and check_stop:
                return self.stop_str if self._add_text(text) else None
            self.output_text += text
        return None

    def append(self, token_ids: Sequence[int], check_stop: bool = True) -> str | None:
        """Decode new output tokens; return the stop string they completed, if any.

        With ``check_stop=False`` (before ``min_tokens``) their text cannot complete a stop string.
        """
        if self.stop_str is not None or self.is_finished:
            return None
        step = self._decoder.step
        for token_id in token_ids:
            text = step(token_id)
            if self._bare_special_texts:
                bare = self._bare_special_texts.get(token_id)
                if bare is not None and self._prev_is_special:
                    text = bare
                self._prev_is_special = bare is not None
            if text and self._add_text(text, check_stop):
                return self.stop_str
        return None

    def finish(self) -> None:
        """The request ended: decode what was held back and let get_delta release everything."""
        if self.stop_str is None and not self.is_finished:
            text = self._decoder.flush()
            if text:
                self._add_text(text)
        self.is_finished = True

    def get_delta(self) -> str:
        """Text not yet returned, minus a tail that could still begin a stop string."""
        end = len(self.output_text)
        if self.stop_str is None and not self.is_finished:
            # Monotone: a tail held back now was held back before too, so end never
            # falls below _num_sent, and a stop match never starts inside sent text.
            end -= self._num_held_back()
        delta = self.output_text[self._num_sent : end]
        self._num_sent = end
        return delta

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's text on its own, as it reads mid-sequence (leading space kept)."""
        if self._anchor is None:
            anchor_ids = list(self.tokenizer.encode("a", add_special_tokens=False))[-1:]
            self._anchor = (anchor_ids, self._decode_all(anchor_ids))
        anchor_ids, anchor_text = self._anchor
        texts = []
        for token_id in token_ids:
            text = self._decode_all([*anchor_ids, token_id])
            ok = anchor_ids and text.startswith(anchor_text)
            texts.append(text[len(anchor_text) :] if ok else self._decode_all([token_id]))
        return texts

    def _add_text(self, text: str, check_stop: bool = True) -> bool:
        """Append decoded text; on a stop string, truncate there and return True."""
        num_old = len(self.output_text)
        self.output_text += text
        if not self.stop or not check_stop:
            return False
        # A stop string completed by the new text starts at most max_len - 1 characters before it.
        search_start = max(0, num_old - self._max_stop_len + 1)
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for stop_str in self.stop:
            start = self.output_text.find(stop_str, search_start)
            if start >= 0 and (best is None or (start + len(stop_str), start) < best[:2]):
                best = (start + len(stop_str), start, stop_str)
        if best is None:
            return False
        end, start, self.stop_str = best
        self.output_text = self.output_text[: end if self.include_stop_str_in_output else start]
        return True

    def _num_held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        text = self.output_text
        for n in range(min(self._max_stop_len - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
