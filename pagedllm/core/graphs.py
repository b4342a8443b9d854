"""Decode graphs: a step of only decodes, traced once per batch size and then replayed without Python.

A single-stream decode step of a small model on CPU spends about a third of its time in
Python: module calls, layer helpers and one dispatch per op, tens of microseconds a layer.
(SmolLM2-135M: about 2.7 of an 8.5 ms step. The step's kernels stream ~100 MB of weights
through the caches, which evicts the interpreter's own data, so that Python runs about twice
as slowly as the same calls in a warm loop.) ``torch.jit.trace`` records the ops one such
step runs, and replaying the recorded graph costs under a microsecond an op, in C++. This is
the CPU counterpart of vLLM's CUDA graphs, and ``enforce_eager`` switches it off as there.

A graph replays exactly the ops of the step it was traced on: Python branches are taken once
and Python numbers become constants. So a graph is traced per batch size, only for steps in
which every request decodes one token. And only when the model, its attention backend and
every linear method declare ``supports_decode_graphs``, which promises two things:
- the forward reads the step's data only from tensors, never from Python copies such as
  ``AttentionMetadata.seq_lens_list``. It branches only on shapes, dtypes and the metadata's
  ``num_decodes`` and ``block_size``;
- every kernel it runs is a torch op (``torch.ops.*``, aten included). A pybind function is
  not recorded: its output would become a constant of the graph.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from pagedllm.core.attention import AttentionMetadata
from pagedllm.core.layers import Attention, Linear

logger = logging.getLogger(__name__)


def unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model``'s decode steps cannot be traced (the parts that do not declare it), or None."""
    missing = [] if getattr(model, "supports_decode_graphs", False) else [f"model {type(model).__name__}"]
    for module in model.modules():
        if isinstance(module, Attention) and not getattr(module.backend, "supports_decode_graphs", False):
            missing.append(f"attention backend {type(module.backend).__name__}")
        elif isinstance(module, Linear) and not getattr(module.quant_method, "supports_decode_graphs", False):
            missing.append(f"linear method {type(module.quant_method).__name__}")
    if not missing:
        return None
    return "not declared by " + ", ".join(dict.fromkeys(missing))  # each part once, in order


class DecodeGraphs:
    """The traced decode step of each batch size up to ``max_batch_size``, traced on first use."""

    def __init__(self, model: nn.Module, max_batch_size: int) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.graphs: dict[int, torch.jit.ScriptFunction] = {}
        # The engine's first step runs eagerly: layers may finish setting up on it (an fp8 KV
        # cache's scales come from the first batch), and a graph would replay that every step.
        self._first_step_done = False
        #: Why steps run eagerly (unsupported parts, or a trace that failed), or None.
        self.disabled: str | None = unsupported_reason(model)
        if self.disabled is not None:
            logger.info("pagedllm: decode graphs off, %s", self.disabled)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: AttentionMetadata) -> torch.Tensor | None:
        """The model's hidden states for this step through its batch size's graph, or None:
        the step is not all decodes, is too large, or graphs are off (the caller runs the model)."""
        n = input_ids.shape[0]
        first_step, self._first_step_done = not self._first_step_done, True
        if self.disabled is not None or first_step or batch.num_decodes != n or n > self.max_batch_size:
            return None
        args = (input_ids, positions, batch.slot_mapping, batch.block_tables, batch.seq_lens, batch.query_start_loc)
        graph = self.graphs.get(n)
        if graph is None:
            return self._trace(args, batch)
        return graph(*args)

    def _trace(self, args: tuple[torch.Tensor, ...], batch: AttentionMetadata) -> torch.Tensor | None:
        """Trace this step (which runs it: its output is returned, not computed again)."""
        model = self.model

        def step(input_ids, positions, slot_mapping, block_tables, seq_lens, query_start_loc):
            metadata = AttentionMetadata(slot_mapping, block_tables, seq_lens, query_start_loc, batch.num_decodes,
                                         batch.block_size, batch.seq_lens_list, batch.query_start_loc_list)  # fmt: skip
            return model(input_ids, positions, metadata)

        try:
            graph, hidden = trace(step, args)
        except Exception as exc:  # an op the tracer cannot record: stay eager
            # The step runs again eagerly; what the partial run wrote to the KV cache (the
            # same keys and values at the same slots) is written again.
            self.disabled = f"tracing a decode step failed ({type(exc).__name__}: {exc})"
            logger.warning("pagedllm: decode graphs off, %s", self.disabled)
            return None
        self.graphs[args[0].shape[0]] = graph
        return hidden


def trace(fn, args: tuple[torch.Tensor, ...]) -> tuple[torch.jit.ScriptFunction, torch.Tensor]:
    """``torch.jit.trace(fn, args)``, in a compilation unit of its own: (the graph, ``fn(*args)`` of the tracing run).

    ``torch.jit.trace`` registers each traced function in torch.jit's one global compilation
    unit, for the life of the process, and with it the tensors its graph holds as constants:
    here the model's weights and KV cache, which would then outlive the engine. So this calls
    the tracer that ``torch.jit.trace`` calls and puts the graph in a unit that lives as long
    as the function. (torch.jit is deprecated in favour of torch.compile and torch.export,
    whose CPU graphs take minutes to compile for a model; where a later torch drops these
    entry points, the trace raises and steps run eagerly.)
    """
    with warnings.catch_warnings():
        # Shape checks (``x.shape[0] <= 8``) warn that the trace depends on them: it is
        # meant to, a graph serves one batch size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        graph, outputs = torch._C._create_graph_by_tracing(fn, args, lambda value: "", True, False)
    (output,) = outputs
    return torch.jit.CompilationUnit().create_function("decode_step", graph), output
