"""llama.cpp as a reference, through llama-cpp-python's C API (`pip install llama-cpp-python`).

The high-level ``Llama`` class runs one sequence at a time, which would understate
llama.cpp. This runner does what llama-server does with ``--parallel N``: up to N
sequences share one context (unified KV cache), each ``llama_decode`` carries every
running sequence's next token plus prompt chunks of newly admitted ones, within
``n_batch`` tokens. Greedy, EOS ignored, exact output lengths.
"""

from __future__ import annotations

import ctypes
import time

import numpy as np

from pagedllm.bench.report import RunResult
from pagedllm.bench.workloads import Workload


class LlamaCpp:
    def __init__(self, gguf_path: str, n_ctx: int, parallel: int, n_threads: int, n_batch: int = 2048,
                 use_extra_bufts: bool = False) -> None:
        import llama_cpp as lc

        self.lc = lc
        lc.llama_backend_init()
        _silence(lc)
        mparams = lc.llama_model_default_params()
        # The AMX repacking buffers crash on machines whose CPU reports AMX that the VM
        # does not let user code use (seen here); the plain CPU kernels are still AVX2/AVX-512.
        mparams.use_extra_bufts = use_extra_bufts
        self.model = lc.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_batch, 512)
        cparams.n_seq_max = parallel
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.kv_unified = True
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.parallel, self.n_batch = parallel, n_batch
        self.batch = lc.llama_batch_init(n_batch, 0, 1)

    def close(self) -> None:
        lc = self.lc
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)

    def run(self, workload: Workload, system: str = "llama.cpp") -> RunResult:
        lc, batch = self.lc, self.batch
        memory = lc.llama_get_memory(self.ctx)
        lc.llama_memory_clear(memory, True)
        pending = list(enumerate(workload.prompts))[::-1]
        free_slots = list(range(self.parallel))[::-1]
        slots: dict[int, dict] = {}  # seq id -> state
        ttft: list[float] = []
        itl: list[float] = []
        num_tokens = 0
        start = time.perf_counter()
        while pending or slots:
            while pending and free_slots:
                _, prompt = pending.pop()
                slots[free_slots.pop()] = {"prompt": prompt, "pos": 0, "out": [], "last": None}
            n = 0
            wants: list[tuple[int, int]] = []  # (batch index, seq id) whose logits we read
            for seq, s in slots.items():  # decodes first
                if s["out"]:
                    _put(batch, n, s["out"][-1], s["pos"], seq, True)
                    wants.append((n, seq))
                    s["pos"] += 1
                    n += 1
            for seq, s in slots.items():  # then prompt chunks, as the budget allows
                if s["out"] or n >= self.n_batch:
                    continue
                take = min(len(s["prompt"]) - s["pos"], self.n_batch - n)
                for j in range(take):
                    last = s["pos"] + j == len(s["prompt"]) - 1
                    _put(batch, n, s["prompt"][s["pos"] + j], s["pos"] + j, seq, last)
                    if last:
                        wants.append((n, seq))
                    n += 1
                s["pos"] += take
            batch.n_tokens = n
            if lc.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed (KV cache full? raise n_ctx)")
            now = time.perf_counter()
            for index, seq in wants:
                logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, index), shape=(self.n_vocab,))
                s = slots[seq]
                s["out"].append(int(logits.argmax()))
                num_tokens += 1
                if s["last"] is None:
                    ttft.append(now - start)
                else:
                    itl.append(now - s["last"])
                s["last"] = now
                if len(s["out"]) == workload.output_len:
                    lc.llama_memory_seq_rm(memory, seq, -1, -1)
                    del slots[seq]
                    free_slots.append(seq)
        elapsed = time.perf_counter() - start
        return RunResult(system, workload.name, elapsed, num_tokens, ttft, itl,
                         {"num_requests": len(workload.prompts), "parallel": self.parallel})


def _put(batch, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
    batch.token[i] = token
    batch.pos[i] = pos
    batch.n_seq_id[i] = 1
    batch.seq_id[i][0] = seq
    batch.logits[i] = logits


def _silence(lc) -> None:
    """llama.cpp logs every load to stderr; keep the benchmark's table readable."""

    @lc.llama_log_callback
    def _quiet(level, text, user_data):  # noqa: ARG001
        pass

    _silence.callback = _quiet  # keep a reference: the C side holds the pointer
    lc.llama_log_set(_quiet, ctypes.c_void_p(0))
