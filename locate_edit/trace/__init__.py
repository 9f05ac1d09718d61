"""Causal tracing (Meng et al. 2022, §2): which hidden states carry a fact from the subject to the prediction.

``core``: facts, settings, the tracer and one fact's trace; ``engine``: the corrupted / restored forward passes;
``facts``: tracing many facts; ``average``: their average and the layer recommendation's rows; ``plot``: heatmaps;
``cli``: ``python -m locate_edit.trace``.
"""

from locate_edit.trace.core import (
    KINDS,
    Fact,
    FactRun,
    FactTrace,
    Prepared,
    Tracer,
    TraceSettings,
    embedding_std,
    fact_run,
    prepare,
    trace_fact,
)

__all__ = ["KINDS", "Fact", "FactRun", "FactTrace", "Prepared", "Tracer", "TraceSettings", "embedding_std", "fact_run",
           "prepare", "trace_fact"]
