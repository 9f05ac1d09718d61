"""The LightningDataModule that trains MEND: (edit, paraphrase, locality) triples from the evaluator's data sets.

Every training sample is an edit example (prompt with the subject filled in, new target), ``paraphrases``
paraphrases of its prompt (the prompt itself when a record has none) and ``locality`` locality examples
(neighbourhood prompts with their expected answers; when a record has none, other records' prompts with their
true targets), drawn without repetition while a record has enough. With ``text_locality > 0`` each sample also has
that many rows of ordinary text (a prefix and its continuation, from WikiText's validation file by default) in
the locality term, so that the KL also sees text unlike the edit prompts (the paper's locality inputs are
unrelated natural text); WikiText's test file, which the evaluator's drawdown reads, is not used.

The training stream is a pure function of the seed and the draw's position: draw ``i`` takes record
``perm_e[i mod n]`` of epoch ``e = i // n`` (a fresh permutation per epoch) and picks its paraphrases and
locality examples with a generator seeded by ``i``. Rank ``r`` of ``W`` takes the ``r``-th slice of every global batch, and a
resumed run starts at ``global_step × accumulate_grad_batches`` batches, so an interrupted run sees the same
batches as an uninterrupted one. Lightning's distributed sampler is not used (``use_distributed_sampler=False``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from mend.errors import MendError
from mend.paths import data_dir, under_data_root
from mend.requests import EditRequest

log = logging.getLogger(__name__)

# Training and validation files under the data root for the data sets that have a training split.
TRAIN_FILES: dict[str, tuple[str, str]] = {
    "counterfact": ("counterfact/counterfact-train.json", "counterfact/counterfact-val.json"),
    "zsre": ("zsre/zsre_mend_train-1k.json", "zsre/zsre_mend_eval_portability_gpt4.json"),
}


@dataclass
class TrainDataSection:
    name: str = "builtin"  # builtin, counterfact (flat format), zsre (MEND format)
    path: str | None = None  # training file (default: TRAIN_FILES under $MEND_DATA_DIR)
    val_path: str | None = None
    limit: int | None = None  # first N training records
    val_limit: int = 64  # validation edits
    variants: int = 4  # builtin: new targets drawn per fact (each a separate training record)
    paraphrases: int = 2  # paraphrases per edit in the edit loss (beside the edit prompt itself)
    locality: int = 4  # locality examples per edit in the KL loss
    text_locality: int = 0  # rows of ordinary text per edit in the KL loss (prefix -> its continuation)
    text_path: str | None = None  # their text file or folder (default: wikitext/wiki.valid.raw in the data root)
    # rows per edit of other records with the same prompt template (the same relation: "{} is located in"), each
    # with its true target: prompts an edit that rewrites the relation instead of the subject's fact would change
    relation_locality: int = 0


PREFIX_WORDS, CONTINUATION_WORDS = 32, 12  # a text row: 32 words of context, the KL on the next 12


def text_pairs(paragraphs: Sequence[str], prefix_words: int = PREFIX_WORDS,
               continuation_words: int = CONTINUATION_WORDS, limit: int = 5000) -> list[tuple[str, str]]:
    """(prefix, continuation) pairs from paragraphs long enough for both; the continuation starts with a space."""
    out = []
    for para in paragraphs:
        words = para.split()
        if len(words) >= prefix_words + continuation_words:
            out.append((" ".join(words[:prefix_words]), " " + " ".join(words[prefix_words:prefix_words + continuation_words])))
            if len(out) >= limit:
                break
    return out


def load_text_pairs(cfg: TrainDataSection) -> list[tuple[str, str]]:
    from mend.data.text import WIKITEXT_VALID, read_text  # not the test file: the evaluator's drawdown text

    if cfg.text_locality <= 0:
        return []
    path = under_data_root(cfg.text_path) if cfg.text_path else data_dir() / WIKITEXT_VALID
    if not Path(path).exists():
        raise MendError(f"data.text_locality={cfg.text_locality} needs text, and '{path}' does not exist: give "
                        "data.text_path=FILE_OR_FOLDER or data.text_locality=0")
    pairs = text_pairs(read_text(path))
    if not pairs:
        raise MendError(f"'{path}' has no paragraph of {PREFIX_WORDS + CONTINUATION_WORDS} words or more for "
                        "data.text_locality")
    return pairs


@dataclass(frozen=True)
class Sample:
    """Strings for one training edit: the edit, ``n_para`` paraphrases and ``n_loc`` locality examples."""

    prompt: str
    target: str
    paraphrases: tuple[str, ...]
    loc_prompts: tuple[str, ...]
    loc_targets: tuple[str, ...]
    loc_kinds: tuple[str, ...] = ()  # per locality row: neighbour | relation | text (empty: all neighbours)


class SampleSource(Dataset):
    """Records (EditRequests) turned into samples; ``__getitem__`` takes a draw position (see module docs)."""

    def __init__(self, requests: Sequence[EditRequest], seed: int = 0, shuffle: bool = True, n_para: int = 1,
                 n_loc: int = 1, texts: Sequence[tuple[str, str]] = (), n_text: int = 0, n_relation: int = 0):
        if not requests:
            raise MendError("no edit records to train on")
        self.requests = list(requests)
        self.texts, self.n_text = list(texts), n_text
        self.seed, self.shuffle, self.n_para, self.n_loc = seed, shuffle, n_para, n_loc
        self.n_relation = n_relation
        self._same_relation: dict[str, list[int]] = {}  # prompt template -> the records that have it
        for k, r in enumerate(self.requests):
            if r.target_true:
                self._same_relation.setdefault(r.prompt, []).append(k)
        self._perms: dict[int, list[int]] = {}

    def __len__(self) -> int:
        return len(self.requests)

    def _record(self, i: int) -> int:
        n = len(self.requests)
        if not self.shuffle:
            return i % n
        epoch = i // n
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()}
        return self._perms[epoch][i % n]

    def __getitem__(self, i: int) -> Sample:
        k = self._record(i)
        r = self.requests[k]
        rng = random.Random(self.seed * 1_000_003 + i)
        paras = _pick(rng, list(r.paraphrases) or [r.text], self.n_para)
        pool = list(r.neighborhood)
        if not pool:  # other records' prompts with their true targets
            n = len(self.requests)
            others = [self.requests[(k + 1 + rng.randrange(max(1, n - 1))) % n] for _ in range(self.n_loc)]
            pool = [(o.text, o.target_true or o.target_new) for o in others]
        neighbours = _pick(rng, pool, self.n_loc)
        texts = _pick(rng, self.texts, self.n_text)
        peers = [j for j in self._same_relation.get(r.prompt, []) if j != k] if self.n_relation else []
        relation = [(self.requests[j].text, self.requests[j].target_true) for j in _pick(rng, peers, self.n_relation)]
        locs = neighbours + relation + texts
        kinds = ("neighbour",) * len(neighbours) + ("relation",) * len(relation) + ("text",) * len(texts)
        return Sample(r.text, r.target_new, tuple(paras), tuple(p for p, _ in locs), tuple(t for _, t in locs),
                      kinds)


def _pick(rng: random.Random, pool: list, n: int) -> list:
    """``n`` items of ``pool``: without repetition while it lasts, then with (none from an empty pool)."""
    if not pool:
        return []
    out = rng.sample(pool, min(n, len(pool)))
    return out + [rng.choice(pool) for _ in range(n - len(out))]


def collate(items: list[Sample]) -> dict[str, list]:
    """Flat lists of strings (paraphrases and locality examples of all edits in order) and, in ``loc_kind``, what
    each locality row is (neighbour, relation or text); tokenisation happens in the LightningModule, next to the
    model."""
    return {
        "prompt": [s.prompt for s in items],
        "target": [s.target for s in items],
        "paraphrase": [p for s in items for p in s.paraphrases],
        "para_target": [s.target for s in items for _ in s.paraphrases],
        "loc_prompt": [p for s in items for p in s.loc_prompts],
        "loc_target": [t for s in items for t in s.loc_targets],
        "loc_kind": [k for s in items for k in (s.loc_kinds or ("neighbour",) * len(s.loc_prompts))],
    }


class StreamSampler(Sampler[int]):
    """Draw positions ``[start, stop)`` in batches of ``batch_size``, this rank's slice of each global batch.

    ``__len__`` counts from 0, not from ``start``: after a resume Lightning counts the batches it already ran.
    """

    def __init__(self, batch_size: int, start_batch: int, stop_batch: int, rank: int = 0, world: int = 1,
                 offset: int = 0):
        self.b, self.start, self.stop, self.rank, self.world, self.offset = (
            batch_size, start_batch, stop_batch, rank, world, offset)

    def __iter__(self) -> Iterator[int]:
        for g in range(self.start, self.stop):
            first = self.offset + (g * self.world + self.rank) * self.b
            yield from range(first, first + self.b)

    def __len__(self) -> int:
        return self.stop * self.b


class ResumableLoader(DataLoader):
    """A DataLoader that tells Lightning it can resume mid-run (its position comes from the restored step)."""

    def state_dict(self) -> dict:
        return {"start_batch": self.sampler.start if isinstance(self.sampler, StreamSampler) else 0}

    def load_state_dict(self, state: dict) -> None:  # the position is derived from the restored global step
        pass


class EditDataModule(pl.LightningDataModule):
    def __init__(self, cfg: TrainDataSection, batch_size: int, seed: int = 0):
        super().__init__()
        self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
        self.train_set: SampleSource | None = None
        self.val_set: SampleSource | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            train, val = load_training_requests(self.cfg, self.seed)
            n_para, n_loc, n_text = self.cfg.paraphrases, self.cfg.locality, self.cfg.text_locality
            texts, n_rel = load_text_pairs(self.cfg), self.cfg.relation_locality
            self.train_set = SampleSource(train, self.seed, True, n_para, n_loc, texts, n_text, n_rel)
            self.val_set = SampleSource(val, self.seed + 1, False, n_para, n_loc, texts, n_text, n_rel)
            log.info("training on %d records, validating on %d", len(train), len(val))

    def _rank_world(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        rank, world = self._rank_world()
        per_step = t.accumulate_grad_batches if t is not None else 1
        max_steps = t.max_steps if t is not None and t.max_steps > 0 else 1000
        start = t.global_step * per_step if t is not None else 0
        sampler = StreamSampler(self.batch_size, start, max_steps * per_step, rank, world)
        return ResumableLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        n = len(self.val_set) // (self.batch_size * world)  # whole batches, the same number on every rank
        sampler = StreamSampler(self.batch_size, 0, n, rank, world)
        return DataLoader(self.val_set, batch_size=self.batch_size, sampler=sampler, collate_fn=collate)

    def statistics_tokens(self, model: Any, tok: Any, n_tokens: int) -> torch.Tensor:
        """Text chunks for input statistics (:func:`mend.data.text.statistics_tokens`, from ``data.text_path``)."""
        from mend.data.text import statistics_tokens

        path = under_data_root(self.cfg.text_path) if self.cfg.text_path else None
        return statistics_tokens(model, tok, n_tokens, path, seed=self.seed)

    def warmup_batches(self, n: int) -> list[dict[str, list[str]]]:
        """``n`` batches for this rank, drawn from far along the training stream (for input statistics)."""
        rank, world = self._rank_world()
        sampler = StreamSampler(self.batch_size, 0, n, rank, world, offset=10_000_000)
        return list(DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, collate_fn=collate))


def load_training_requests(cfg: TrainDataSection, seed: int = 0) -> tuple[list[EditRequest], list[EditRequest]]:
    """(train, validation) requests of a data set: built-in splits, or the training / validation files."""
    from mend.data.registry import load_dataset

    if cfg.name == "builtin":
        seeds = [seed + 7919 * v for v in range(max(1, cfg.variants))]  # seeds far apart: independent draws
        train = [r for s in seeds for r in load_dataset("builtin", cfg.path, cfg.limit, split="train", seed=s).requests]
        val = load_dataset("builtin", cfg.path, cfg.val_limit, split="validation", seed=seed).requests
        return train, val
    if cfg.name not in TRAIN_FILES:
        raise MendError(f"data.name must be builtin or one of {', '.join(sorted(TRAIN_FILES))} for training, "
                        f"got '{cfg.name}'")
    train_rel, val_rel = TRAIN_FILES[cfg.name]
    train_path, val_path = (str(data_dir() / d if p is None else under_data_root(p))
                            for p, d in ((cfg.path, train_rel), (cfg.val_path, val_rel)))
    train = load_dataset(cfg.name, train_path, cfg.limit).requests
    val = load_dataset(cfg.name, val_path, cfg.val_limit).requests
    return train, val

