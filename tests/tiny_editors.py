"""Editors with settings small enough for the 4-layer tiny models: every registered editor, for contract tests."""

from __future__ import annotations

import torch

from mend.adapters import get_adapter
from mend.editor import create_editor

_CLOSED_FORM = {"stats": {"corpus": "self", "tokens": 256, "seq_len": 32}, "templates": {"spec": [[4, 2]]},
                "value": {"steps": 3}, "guard": {"action": "off"}}


def _untrained_mend(model, tok, requests):
    """An untrained MEND editor (the hypernetwork at initialisation is one preconditioned gradient step) on the
    MLP weights of the last two layers; statistics warmed on the requests, P from a little random text."""
    from mend.learned.hypernet import HypernetConfig
    from mend.learned.mend.editor import untrained_editor

    refs = get_adapter(model).weight_refs(layers=[-2, -1])
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    return untrained_editor(model, tok, refs, HypernetConfig(rank=8, precondition=True), requests, ids)


def _untrained_malmen(model, tok, requests):
    from mend.learned.hypernet import HypernetConfig
    from mend.learned.malmen.editor import untrained_malmen

    refs = get_adapter(model).weight_refs(["mlp_out"], [-2, -1])
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    return untrained_malmen(model, tok, refs, HypernetConfig(rank=8, precondition=True, positions="target"),
                            requests, ids, lambda_init=1.0)


def _untrained_serac(model, tok, requests):
    """SERAC with an untrained scope classifier (a random projection of standardised features)."""
    from mend.learned.serac.editor import SeracEditor
    from mend.learned.serac.scope import ScopeClassifier, ScopeConfig, text_features

    torch.manual_seed(0)
    classifier = ScopeClassifier(model.config.hidden_size, ScopeConfig(dim=16, threshold=0.5))
    classifier.fit_features(text_features(model, tok, [r.text for r in requests] + ["a b c", "hello there"], -1))
    return SeracEditor(classifier=classifier)


# name -> (model, tokenizer, requests) -> an editor with settings small enough for the 4-layer tiny models
TINY_EDITORS = {
    "ft": lambda *_: create_editor("ft", {"layers": [0, -1], "lr": 1e-2, "steps": 2, "norm_constraint": 2e-2}),
    "mend": _untrained_mend,
    "malmen": _untrained_malmen,
    "serac": _untrained_serac,
    "rome": lambda *_: create_editor("rome", _CLOSED_FORM, {"layer": 1}),
    "r-rome": lambda *_: create_editor("r-rome", _CLOSED_FORM, {"layer": 1}),
    "memit": lambda *_: create_editor("memit", _CLOSED_FORM, {"layers": [1, 2]}),
    "emmet": lambda *_: create_editor("emmet", _CLOSED_FORM, {"layers": [1, 2]}),
    "alphaedit": lambda *_: create_editor("alphaedit", _CLOSED_FORM,
                                          {"layers": [1, 2], "null_threshold": 0.5, "null_relative": True}),
}
