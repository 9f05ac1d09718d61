"""mend: a model-editing framework (learned MEND editors, closed-form editors, one evaluator)."""

__version__ = "0.1.0"
