"""python -m mend.edit: apply one editor to a model for inline or file requests; print before / after."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mend.api import create_editor
from mend.cli import run
from mend.config import SEED, ModelSection, build_config
from mend.editor import EditResult, apply_edit, editor_class
from mend.errors import ConfigError
from mend.io import write_dir_atomically, write_json
from mend.models import load_model
from mend.requests import EditRequest, load_requests, make_request, with_leading_space
from mend.scoring import encode_pair, greedy_ids, greedy_text, score_targets

USAGE = """
usage: python -m mend.edit [config.yaml] [key=value ...]

Apply one editor to a model and print the target probabilities and a greedy continuation before and after.

  model=NAME            alias (smollm2-135m, tiny-gpt2, ...), local path or Hugging Face id [smollm2-135m]
  model.device_map=auto shard a model too large for one device over all of them (accelerate)
  editor=NAME           ft, rome, r-rome, memit, emmet, alphaedit, mend, ... [ft]
  editor.KEY=VALUE      editor settings (e.g. editor.layers=[6] editor.lr=1e-3)
  prompt=TEXT           prompt with {} where the subject goes, e.g. "{} is located in the city of"
  subject=TEXT          the subject, e.g. "The Eiffel Tower"
  target=TEXT           the new target, e.g. " Rome" (a leading space is added when missing)
  target_true=TEXT      the current target; default: the model's greedy continuation of the same length
  requests=PATH         requests from a JSON / JSONL file instead (fields prompt, subject, target_new, ...)
  mode=batch|sequential all requests in one edit, or one edit after another [batch]
  json=PATH             write the figures as JSON
  save=DIR              write the edited model (save_pretrained) and its tokenizer
  lora=DIR              write the edit as a PEFT LoRA adapter (exact: rank = the update's rank)
  lora.rank=R           truncate each weight's update to rank R (SVD); the relative residual is printed
  seed=N                random seed [0]
  max_new_tokens=N      length of the greedy continuations [12]

example:
  python -m mend.edit editor=ft prompt="{} is located in the city of" subject="The Eiffel Tower" target=" Rome"
"""


TEXT_KEYS = ("prompt", "subject", "target", "target_true", "requests", "json", "save", "lora.dir")


@dataclass
class LoraSection:
    dir: str | None = None  # lora=DIR
    rank: int | None = field(default=None, metadata={"min": 1})  # None: exact


@dataclass
class EditCommand:
    model: ModelSection = field(default_factory=ModelSection)
    editor: dict[str, Any] = field(default_factory=lambda: {"name": "ft"})
    prompt: str | None = None
    subject: str | None = None
    target: str | None = None
    target_true: str | None = None
    requests: str | None = None
    mode: str = "batch"
    json: str | None = None
    save: str | None = None
    lora: LoraSection = field(default_factory=LoraSection)
    seed: int = field(default=0, metadata=SEED)
    max_new_tokens: int = field(default=12, metadata={"min": 1})


def read_requests(cfg: Any) -> list[EditRequest]:
    """Requests from ``requests=PATH`` or the inline keys (not both)."""
    inline = {k: cfg[k] for k in ("prompt", "subject", "target", "target_true") if cfg[k] is not None}
    if cfg.requests is not None:
        if inline:
            raise ConfigError(f"give either requests=PATH or inline {'/'.join(inline)}, not both")
        return load_requests(cfg.requests)
    missing = [k for k in ("prompt", "subject", "target") if k not in inline]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: give prompt=, subject= and target= (or requests=PATH)")
    prompt, subject = inline["prompt"], inline["subject"]
    if isinstance(prompt, str) and "{}" not in prompt and isinstance(subject, str) and subject and subject in prompt:
        raise ConfigError(f"prompt has no '{{}}' placeholder: write it as {prompt.replace(subject, '{}', 1)!r}")
    target = inline["target"]
    true = inline.get("target_true")
    return [make_request(inline["prompt"], inline["subject"], with_leading_space(target),
                         with_leading_space(true) if true else None)]


def with_true_targets(model: PreTrainedModel, tok: PreTrainedTokenizerBase, reqs: list[EditRequest]) -> list[EditRequest]:
    """Fill a missing ``target_true`` with the unedited model's greedy continuation of the target's length."""
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    out = []
    for r in reqs:
        if r.target_true is None:
            n = len(encode_pair(tok, r.text, r.target_new, enc_dec)[1])
            text = tok.decode(greedy_ids(model, tok, r.text, n))
            r = replace(r, target_true=text if text.strip() else None)
        out.append(r)
    return out


def measure(model: PreTrainedModel, tok: PreTrainedTokenizerBase, reqs: list[EditRequest], n_new: int) -> list[dict]:
    """P(target_new), P(target_true) (whole-string products) and a greedy continuation per request."""
    news = score_targets(model, tok, [r.text for r in reqs], [r.target_new for r in reqs])
    with_true = [r for r in reqs if r.target_true]
    trues = iter(score_targets(model, tok, [r.text for r in with_true], [r.target_true for r in with_true]))
    rows = []
    for r, new in zip(reqs, news):
        true = next(trues).prob if r.target_true else None
        rows.append({"p_new": new.prob, "p_true": true, "generation": greedy_text(model, tok, r.text, n_new)})
    return rows


def save_model(model: PreTrainedModel, tok: PreTrainedTokenizerBase, out: str) -> Path:
    """save_pretrained into a temporary folder beside ``out``, then move it into place."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return write_dir_atomically(Path(out), write)


def main(argv: list[str]) -> int:
    cfg = build_config(EditCommand, argv, text_keys=TEXT_KEYS)
    if cfg.mode not in ("batch", "sequential"):
        raise ConfigError(f"mode must be batch or sequential for mend.edit, got '{cfg.mode}'")
    reqs = read_requests(cfg)
    user = OmegaConf.to_container(cfg.editor, resolve=True)
    name = user.pop("name")
    editor_class(name)  # fail on an unknown editor before loading the model
    torch.manual_seed(cfg.seed)
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.device_map)
    from mend.adapters import get_adapter

    get_adapter(model)  # fail on an unsupported architecture before any work
    editor = create_editor(name, model, **user)
    editor.prepare(model, tok)  # statistics, templates: once per model, not part of the edit time
    reqs = with_true_targets(model, tok, reqs)
    before = measure(model, tok, reqs, cfg.max_new_tokens)
    seconds, results = 0.0, []
    for chunk in ([reqs] if cfg.mode == "batch" else [[r] for r in reqs]):
        t0 = time.perf_counter()
        result = editor.edit(model, tok, chunk)
        seconds += time.perf_counter() - t0
        results.append(result)
        apply_edit(model, result)
    after = measure(model, tok, reqs, cfg.max_new_tokens)
    report = {"model": cfg.model.name, "editor": name, "seconds": round(seconds, 4), "requests": []}
    for r, b, a in zip(reqs, before, after):
        report["requests"].append({
            "prompt": r.prompt, "subject": r.subject, "target_new": r.target_new, "target_true": r.target_true,
            "p_new_before": b["p_new"], "p_new_after": a["p_new"],
            "p_true_before": b["p_true"], "p_true_after": a["p_true"],
            "generation_before": b["generation"], "generation_after": a["generation"],
        })
    print_report(report)
    if cfg.json:
        write_json(cfg.json, report)
        print(f"figures written to {cfg.json}")
    combined = EditResult.combine(results)
    if cfg.lora.dir:
        export = combined.to_peft(cfg.lora.dir, model, cfg.lora.rank)
        ranks = sorted(set(export.ranks.values()))
        print(f"LoRA adapter written to {export.path} ({len(export.ranks)} module{'s' * (len(export.ranks) != 1)}, "
              f"rank {'/'.join(map(str, ranks))}, relative residual {export.max_residual:.2e})")
    if cfg.save:
        combined.weights_only("save=DIR")
        print(f"edited model saved to {save_model(model, tok, cfg.save)}")
    return 0


def print_report(report: dict) -> None:
    n = len(report["requests"])
    print(f"model {report['model']} | editor {report['editor']} | {n} request{'s' * (n != 1)} | "
          f"edit {report['seconds']:.2f} s")
    for i, r in enumerate(report["requests"]):
        print(f"[{i}] {r['prompt'].replace('{}', r['subject'])}")
        print(f"    P(new  {r['target_new']!r}): {r['p_new_before']:.4f} -> {r['p_new_after']:.4f}")
        if r["target_true"] is not None:
            print(f"    P(true {r['target_true']!r}): {r['p_true_before']:.4f} -> {r['p_true_after']:.4f}")
        print(f"    before: {r['generation_before']!r}")
        print(f"    after:  {r['generation_after']!r}")


if __name__ == "__main__":
    run(main, USAGE)
