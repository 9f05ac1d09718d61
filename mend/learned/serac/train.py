"""``python -m mend.train configs/train/serac.yaml``: train SERAC's scope classifier with Lightning.

The frozen base model embeds every text once (pooled hidden states, :mod:`mend.learned.serac.scope`); the
classifier then trains on those features alone, so a step costs microseconds and the run is dominated by the one
embedding pass. Each step takes ``trainer.batch_size`` edits; its queries are the edits' paraphrases (in scope of
their own edit only) and hard negatives: the edits' neighbourhood prompts (same relation, nearby subjects) and other
records' prompts of the same relation template. Queries carry a target, as the evaluator scores them. Loss: binary
cross-entropy of every (query, edit) pair of the batch, positives and negatives weighted equally. Validation:
in-scope recall (a paraphrase retrieves its own edit above the threshold, among all validation edits) and
out-of-scope rejection (a neighbour retrieves none); ``val/score`` is their harmonic mean.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mend.io import write_json
from mend.learned.run_dir import CONFIG_FILE, EDITOR_FILE, METRICS_FILE
from mend.learned.serac.scope import ScopeClassifier, ScopeConfig, text_features
from mend.requests import EditRequest


def _queries(reqs: list[EditRequest], rng: random.Random, relation: int) -> tuple[list[str], list[list[str]],
                                                                                  list[list[str]]]:
    """Edit texts, in-scope queries and out-of-scope queries of each request."""
    by_template: dict[str, list[int]] = {}
    for i, r in enumerate(reqs):
        by_template.setdefault(r.prompt, []).append(i)
    edits, pos, neg = [], [], []
    for i, r in enumerate(reqs):
        targets = [r.target_new] + ([r.target_true] if r.target_true else [])
        edits.append(r.text)
        pos.append([p + rng.choice(targets) for p in (r.text, *r.paraphrases)])
        mates = [j for j in by_template[r.prompt] if j != i]
        rel = [reqs[j].text + (reqs[j].target_true or reqs[j].target_new) for j in rng.sample(mates, min(relation,
                                                                                                    len(mates)))]
        neg.append([p + a for p, a in r.neighborhood] + rel)
    return edits, pos, neg


class _Features:
    """Pooled features of every text of a request set, computed once with the frozen model."""

    def __init__(self, model, tok, reqs, layer, rng, relation, progress):
        edits, pos, neg = _queries(reqs, rng, relation)
        texts = sorted({*edits, *(q for qs in pos for q in qs), *(q for qs in neg for q in qs)})
        index = {t: k for k, t in enumerate(texts)}
        self.feats = text_features(model, tok, texts, layer, progress=progress)
        self.edit = torch.tensor([index[t] for t in edits])
        self.pos = [[index[q] for q in qs] for qs in pos]
        self.neg = [[index[q] for q in qs] for qs in neg]


def _batch_loss(clf: ScopeClassifier, f: _Features, ids: list[int]) -> torch.Tensor:
    e = clf.embed(f.feats[f.edit[ids]])  # (B, dim)
    q_idx, owner = [], []
    for col, i in enumerate(ids):
        q_idx += f.pos[i] + f.neg[i]
        owner += [col] * len(f.pos[i]) + [-1] * len(f.neg[i])
    logits = clf.logits(clf.embed(f.feats[q_idx]), e)  # (Q, B)
    owner_t = torch.tensor(owner)
    labels = torch.zeros_like(logits)
    hit = owner_t >= 0
    labels[hit.nonzero().flatten(), owner_t[hit]] = 1.0
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return 0.5 * losses[labels == 1].mean() + 0.5 * losses[labels == 0].mean()


@torch.no_grad()
def scope_metrics(clf: ScopeClassifier, f: _Features) -> dict[str, float]:
    memory = clf.embed(f.feats[f.edit])
    thr = clf.cfg.threshold
    q = [(k, i) for i, qs in enumerate(f.pos) for k in qs]
    idx, p = clf.retrieve(clf.embed(f.feats[[k for k, _ in q]]), memory)
    recall = float(((idx == torch.tensor([i for _, i in q])) & (p > thr)).float().mean())
    negs = [k for qs in f.neg for k in qs]
    _, pn = clf.retrieve(clf.embed(f.feats[negs]), memory)
    reject = float((pn <= thr).float().mean())
    score = 2 * recall * reject / (recall + reject) if recall + reject > 0 else 0.0
    return {"in_scope_recall": recall, "out_of_scope_rejection": reject, "score": score}


def train_serac(cfg: Any, out: Path) -> int:
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from mend.learned.lit_data import load_training_requests
    from mend.learned.serac.run import SeracInfo, save_serac
    from mend.models import fingerprint, load_model

    t0 = time.perf_counter()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)
    model, tok = load_model(cfg.model.name, cfg.model.dtype, cfg.model.device, cfg.model.device_map)
    scfg: ScopeConfig = OmegaConf.to_object(cfg.serac)
    train_reqs, val_reqs = load_training_requests(cfg.data, cfg.seed)
    rng = random.Random(cfg.seed)
    progress = bool(cfg.trainer.progress)
    train = _Features(model, tok, train_reqs, scfg.layer, rng, cfg.data.relation_locality, progress)
    val = _Features(model, tok, val_reqs, scfg.layer, rng, cfg.data.relation_locality, progress)
    clf = ScopeClassifier(model.config.hidden_size, scfg)
    clf.fit_features(train.feats)
    print(f"SERAC on {cfg.model.name}: {len(train_reqs)} training edits, {len(train.feats)} texts embedded "
          f"({time.perf_counter() - t0:.0f} s); untrained scope: {scope_metrics(clf, val)}")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.clf = clf

        def training_step(self, ids, _):
            loss = _batch_loss(self.clf, train, ids.tolist())
            self.log("train/loss", loss, prog_bar=True, batch_size=len(ids))
            return loss

        def validation_step(self, *_):
            for k, v in scope_metrics(self.clf, val).items():
                self.log(f"val/{k}", v, batch_size=1)

        def configure_optimizers(self):
            return torch.optim.Adam(self.clf.parameters(), lr=cfg.optim.lr)

    t = cfg.trainer
    loader = torch.utils.data.DataLoader(torch.arange(len(train_reqs)), batch_size=t.batch_size, shuffle=True)
    trainer = pl.Trainer(max_steps=t.max_steps, fast_dev_run=t.fast_dev_run, accelerator="cpu", devices=1,
                         logger=TensorBoardLogger(str(out), name="logs", version=""), enable_checkpointing=False,
                         enable_progress_bar=progress, log_every_n_steps=t.log_every_n_steps,
                         val_check_interval=min(t.val_check_interval, max(1, len(loader))),
                         check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0,
                         enable_model_summary=False)
    trainer.fit(Module(), train_dataloaders=loader, val_dataloaders=[torch.zeros(1)])
    clf.eval()
    scope = scope_metrics(clf, val)
    info = SeracInfo(cfg.model.name, fingerprint(model), model.config.hidden_size, scfg, int(trainer.global_step))
    save_serac(out, clf, info, OmegaConf.to_container(cfg, resolve=True))
    metrics: dict[str, Any] = {"method": "serac", "steps": int(trainer.global_step),
                               "train_seconds": time.perf_counter() - t0, "validation": scope}
    print(f"scope on {len(val_reqs)} validation edits: " + ", ".join(f"{k} {v:.3f}" for k, v in scope.items()))
    if cfg.eval.enabled and not t.fast_dev_run:
        metrics["evaluation"] = _evaluate(cfg, out, model, tok)
    write_json(out / METRICS_FILE, metrics)
    print(f"editor: {out / EDITOR_FILE} (+ {CONFIG_FILE}); metrics: {out / METRICS_FILE}")
    return 0


def _evaluate(cfg: Any, out: Path, model: Any, tok: Any) -> dict[str, Any]:
    """The trained editor on held-out data beside the unedited model; prints the table."""
    from mend.editor import create_editor
    from mend.learned.train import held_out_evaluation

    results, path, command = held_out_evaluation(
        cfg, out, model, tok, [("serac", create_editor("serac", {"checkpoint": str(out)}))], out)
    return {"unedited": results["pre"], "trained": results["editors"]["serac"]["metrics"], "results": str(path),
            "command": command}
