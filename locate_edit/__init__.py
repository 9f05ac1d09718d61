"""locate_edit: closed-form editors (ROME, MEMIT, ...) and causal tracing."""
