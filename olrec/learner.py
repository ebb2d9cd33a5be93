"""The in-process online learner: micro-batches, each scored before it is learned.

Per batch: counter features from strictly earlier events; rows pulled for the
batch's unique ids (admission happens here: it depends on id counts, never on
labels); one forward pass whose detached output is the batch's progressive
prediction; backward; a sparse optimizer step on the pulled rows and an Adam
step on the dense tower; the wide part (per-event FTRL) scores and learns each
event in turn; an online stacker blends the two; then counters and numeric
statistics learn the batch.

Per-id state lives in a :class:`~olrec.ps.Store`: in this process by default,
or in parameter-server shards (:class:`~olrec.ps.ShardedTables`), so the one
step below is the in-process learner and each Ray Train worker alike. Dense
state is the worker's own; a :class:`DenseSync` (see :mod:`olrec.train`)
reduces it across workers at the points :meth:`OnlineLearner.step` marks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .embedding import EmbeddingTable, TableConfig
from .features import Batch, Counters, FeatureSpec
from .ids import TAG_BITS, tag_keys
from .model import Arch, DenseTower
from .ps import Fetch, LocalStore, Pulled, Store
from .wide import FTRL, Wide


@dataclass(frozen=True)
class LearnerConfig:
    batch_size: int = 4096
    #: Batches start at ``warmup_batch_size`` and grow to ``batch_size`` over the
    #: first ``warmup_events``: a young deep part gains from many small steps
    #: (+0.006 AUC on MovieLens-100K without the wide part), but the per-event
    #: wide part makes it worth only +0.001 there, for 10% of the speed: off by default.
    warmup_batch_size: int = 64
    warmup_events: int = 0
    dim: int = 4
    arch: Arch = "deepfm"
    hidden: tuple[int, ...] = (32,)
    sparse_optimizer: str = "adagrad"
    sparse_lr: float = 0.05
    init_std: float = 0.01  # initial embedding rows ~ N(0, init_std)
    dense_lr: float = 0.006
    admit_after: int = 1
    ttl_events: int | None = None
    expire_every: int = 100  # batches between expiry sweeps
    #: The wide part: a per-event FTRL logistic regression (see olrec.wide) whose
    #: probability is averaged with the deep part's. False: the deep part alone.
    wide: bool = True
    wide_weight: float = 0.7  # its initial weight in the blend; the blend is learned online
    wide_alpha: float = 0.15
    wide_l2: float = 1.0
    seed: int = 0
    threads: int = 1  # torch intra-op threads; small batches run fastest on one

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 1 <= self.warmup_batch_size <= self.batch_size:
            raise ValueError(f"warmup_batch_size must be in [1, batch_size={self.batch_size}], got {self.warmup_batch_size}")
        if self.warmup_events < 0:
            raise ValueError(f"warmup_events must be >= 0, got {self.warmup_events}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.arch not in ("deepfm", "dcn"):
            raise ValueError(f"arch must be 'deepfm' or 'dcn', got {self.arch!r}")
        if not 0 <= self.wide_weight <= 1:
            raise ValueError(f"wide_weight must be in [0, 1], got {self.wide_weight}")
        if self.wide_l2 < 0:
            raise ValueError(f"wide_l2 must be >= 0, got {self.wide_l2}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden layer sizes must be >= 1, got {self.hidden}")
        for name in ("sparse_lr", "dense_lr", "wide_alpha"):
            v = getattr(self, name)
            if not (v > 0 and np.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v}")


@dataclass
class StepResult:
    pred: np.ndarray  # progressive predictions for the batch, (B,)
    label: np.ndarray
    loss: float
    numeric: np.ndarray  # (B, spec.n_numeric) the dense tower's raw numeric input: context numerics, counter features


class DenseSync(Protocol):
    """Reduces a worker's dense gradients with its peers' (see :mod:`olrec.train`)."""

    def reduce_grads(self, params: list[torch.nn.Parameter], n_events: int) -> bool:
        """Replace each ``.grad`` by the event-weighted mean over workers; False
        when no worker had events (then no optimizer step is taken)."""
        ...


def learner_tables(spec: FeatureSpec, cfg: LearnerConfig) -> list[TableConfig]:
    """The per-id tables a learner keeps: sparse rows, counters, the wide part's state.

    One table holds every sparse field's rows (a field's index tags its keys):
    one lookup, one gather and one optimizer step per batch, and one pull and
    push per parameter-server shard."""
    sparse = TableConfig(name="sparse", dim=cfg.dim + 1, optimizer=cfg.sparse_optimizer,  # type: ignore[arg-type]
                         lr=cfg.sparse_lr, init_std=cfg.init_std, admit_after=cfg.admit_after,
                         ttl_events=cfg.ttl_events, seed=cfg.seed)
    return [sparse, Counters.table_config(spec, cfg.ttl_events), *([Wide.table_config(cfg.ttl_events)] if cfg.wide else [])]


class OnlineLearner:
    def __init__(self, spec: FeatureSpec, cfg: LearnerConfig = LearnerConfig(), store: Store | None = None) -> None:
        self.spec, self.cfg = spec, cfg
        torch.manual_seed(cfg.seed)
        self.store = store if store is not None else LocalStore(learner_tables(spec, cfg))
        self.counters = Counters(spec, ttl_events=cfg.ttl_events, store=self.store)
        self.model = DenseTower(len(spec.sparse_fields), cfg.dim, spec.n_numeric,
                                arch=cfg.arch, hidden=cfg.hidden, prior=self._prior_weights())
        # fused: one kernel for all parameters, a third of the per-step cost on CPU
        self.opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=cfg.dense_lr, fused=True)
        self.wide = (Wide(spec, spec.n_numeric, FTRL(alpha=cfg.wide_alpha, l2=cfg.wide_l2), ttl_events=cfg.ttl_events,
                          store=self.store) if cfg.wide else None)
        # The blend of the deep and wide logits is itself learned online (a
        # stacked logistic regression): a stream that rewards per-event ids
        # leans on the wide part, a latent-factor world on the deep one.
        self.blend = torch.nn.Linear(2, 1)
        with torch.no_grad():
            self.blend.weight.copy_(torch.tensor([[1 - cfg.wide_weight, cfg.wide_weight]]))
            self.blend.bias.zero_()
        self.blend_opt = torch.optim.Adam(self.blend.parameters(), lr=0.05)
        self.events = 0
        self.batches = 0
        #: Recent inputs of the dense tower (up to 1024 rows of the last batch):
        #: an int8 export calibrates its activation scales on them.
        self.recent_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self.expires = True  # sweep the store for idle rows (one worker of several does)
        self.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> "OnlineLearner":
        """Run the dense tower on ``device`` (a GPU); rows, the wide part and the blend stay on the CPU."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def tables(self) -> list[EmbeddingTable]:
        """Every per-id table the learner keeps, when they live in this process."""
        return list(self._local_store().tables.values())

    @property
    def table(self) -> EmbeddingTable:
        """The sparse rows' table, when it lives in this process."""
        return self._local_store().tables["sparse"]

    def _local_store(self) -> LocalStore:
        if not isinstance(self.store, LocalStore):
            raise TypeError(f"this learner's tables live in {type(self.store).__name__}, not in this process")
        return self.store

    def dense_params(self) -> list[torch.nn.Parameter]:
        """The parameters learned by gradient in this process: the tower's and the blend's."""
        ps = [p for p in self.model.parameters() if p.requires_grad]
        return ps + (list(self.blend.parameters()) if self.wide is not None else [])

    def additive_state(self) -> list[np.ndarray]:
        """Dense state that grows by adding each event's share (float64 copies):
        the numeric statistics as sums, the wide part's numeric (z, n), the
        global counts, the events learned. Workers merge it by adding deltas."""
        out = [*self.model.norm.sums(), self.counters.total.copy(), np.array([float(self.events)])]
        return out + ([self.wide.dense.copy()] if self.wide is not None else [])

    def set_additive_state(self, state: list[np.ndarray]) -> None:
        self.model.norm.set_sums(*state[:3])
        self.counters.total = state[3].copy()
        self.events = int(round(state[4][0]))
        if self.wide is not None:
            self.wide.dense = state[5].copy()

    def dense_state_dict(self) -> dict:
        """Everything dense (for a checkpoint; the per-id tables are the store's)."""
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "blend": self.blend.state_dict(), "blend_opt": self.blend_opt.state_dict(),
                "total": self.counters.total.copy(), "wide": None if self.wide is None else self.wide.dense.copy(),
                "events": self.events, "batches": self.batches, "calibration": self.calibration()}

    def calibration(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Copies of :attr:`recent_inputs` (emb, num) as float32 arrays, or None before the first batch."""
        if self.recent_inputs is None:
            return None
        return tuple(t.detach().cpu().numpy().astype(np.float32, copy=True) for t in self.recent_inputs)  # type: ignore[return-value]

    def load_dense_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.blend.load_state_dict(state["blend"])
        self.blend_opt.load_state_dict(state["blend_opt"])
        self.counters.total = state["total"].copy()
        if self.wide is not None:
            self.wide.dense = state["wide"].copy()
        self.events, self.batches = state["events"], state["batches"]

    def numeric_names(self) -> list[str]:
        """Names of the columns of :attr:`StepResult.numeric`."""
        return [*self.spec.numeric, *self.counters.feature_names()]

    def _prior_weights(self) -> torch.Tensor:
        """Initial weights of the model's prior read: logit(user rate) + logit(item rate) - logit(global rate)."""
        w = torch.zeros(self.spec.n_numeric)
        if self.spec.counters:
            names = self.numeric_names()
            w[names.index("user_id:rate_logit")] = 1.0
            w[names.index("item_id:rate_logit")] = 1.0
            w[names.index("global:rate_logit")] = -1.0
        return w

    # -- inputs -------------------------------------------------------------
    def _numeric(self, batch: Batch, online: bool, prefetched: tuple | None = None) -> tuple[torch.Tensor, tuple]:
        """The tower's numeric input (context numerics, then counter features) and the counters' update."""
        feats, updates = self.counters.features(batch, online=online, prefetched=prefetched)
        return torch.from_numpy(np.concatenate([batch.numeric, feats], 1)).to(self.device), updates

    def field_keys(self, batch: Batch) -> tuple[np.ndarray, list[slice]]:
        """Table keys of every sparse field of the batch, concatenated, and each field's slice.

        Keys are tagged by the field's index (:func:`olrec.ids.tag_keys`)."""
        parts, spans, at = [], [], 0
        for i, f in enumerate(self.spec.sparse_fields):
            k = batch.keys[f] if f in batch.keys else batch.multi[f][0]
            parts.append(tag_keys(k, i))
            spans.append(slice(at, at + len(k)))
            at += len(k)
        return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), spans

    def vectors(self, field: str, ids: np.ndarray) -> np.ndarray:
        """(len(ids), dim) embedding vectors of ``ids`` in ``field`` (e.g. user and
        item vectors for retrieval); ids not admitted get the shared default row."""
        if field not in self.spec.categorical:
            raise ValueError(f"{field!r} is not a single-valued sparse field; have {self.spec.categorical}")
        keys = tag_keys(np.asarray(ids, np.int64), self.spec.sparse_fields.index(field))
        pulled = self.store.fetch("sparse", keys)
        return pulled.weights[pulled.inverse, : self.cfg.dim]

    @staticmethod
    def _blend_inputs(deep_logit: torch.Tensor, p_wide: np.ndarray) -> torch.Tensor:
        p = np.clip(p_wide, 1e-6, 1 - 1e-6)
        return torch.stack([deep_logit.cpu(), torch.from_numpy(np.log(p / (1 - p)).astype(np.float32))], 1)

    @torch.no_grad()
    def _wide_inputs(self, num: torch.Tensor) -> np.ndarray:
        """The wide part's numeric inputs: the deep part's standardisation of them."""
        return self.model.norm(num).cpu().numpy().astype(np.float64)

    def rows_per_field(self) -> dict[str, int]:
        """Rows the table holds for each sparse field (the default row not counted)."""
        tags = np.bincount(self.table.held_keys() >> TAG_BITS, minlength=len(self.spec.sparse_fields))
        return {f: int(tags[i]) for i, f in enumerate(self.spec.sparse_fields)}

    def _pool(self, batch: Batch, pulled: Pulled, spans: list[slice], grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, F, D+1) pooled rows and the pulled rows' leaf tensor (receives gradients)."""
        w = torch.from_numpy(pulled.weights).to(self.device)
        w.requires_grad_(grad)
        idx = torch.from_numpy(pulled.inverse.astype(np.int64)).to(self.device)
        n_single = len(self.spec.categorical)
        cols = [F.embedding(idx[: n_single * len(batch)].view(n_single, -1).T, w)] if n_single else []
        for f, span in zip(self.spec.multi, spans[n_single:]):
            lengths = batch.multi[f][1]
            offsets = torch.from_numpy(np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)).to(self.device)
            cols.append(F.embedding_bag(idx[span], w, offsets, mode="mean").unsqueeze(1))
        return torch.cat(cols, 1), w

    def next_batch_size(self) -> int:
        c = self.cfg
        if self.events >= c.warmup_events:
            return c.batch_size
        grown = c.warmup_batch_size + (c.batch_size - c.warmup_batch_size) * self.events / max(c.warmup_events, 1)
        return int(min(c.batch_size, grown))

    # -- the loop -----------------------------------------------------------
    def learn(self, batch: Batch) -> None:
        """Learn ``batch`` in order, ``batch_size`` events at a time, as a stream
        of micro-batches would (each scored before it is learned)."""
        n = len(batch)
        for start in range(0, n, self.cfg.batch_size):
            self.step(batch.slice(start, min(start + self.cfg.batch_size, n)))

    def step(self, batch: Batch, sync: DenseSync | None = None, tag: Any = None) -> StepResult:
        """Score the batch, then learn it. ``sync``: merge dense gradients with
        other workers'; ``tag``: what the store's ``done()`` returns once this
        batch's pushes are applied."""
        torch.set_num_threads(self.cfg.threads)
        t_last = float(batch.ts[-1]) if len(batch) else 0.0
        # Every table's rows in one fetch: one round trip per shard per batch.
        keys, spans = self.field_keys(batch)
        found_c, fetch_c = self.counters.lookup(batch)
        requests = [Fetch("sparse", keys, observe=True, ts=t_last, event=self.events), fetch_c]
        if self.wide is not None:
            found_w, fetch_w = self.wide.lookup(batch, t_last, self.events)
            requests.append(fetch_w)
        pulled, pulled_c, *pulled_w = self.store.fetch_many(requests)
        num, updates = self._numeric(batch, online=True, prefetched=(found_c, pulled_c))
        emb, w = self._pool(batch, pulled, spans, grad=True)
        # Statistics of the context numerics first: they hold no label, and a
        # raw input like a release year must not reach the first batch
        # unscaled. Counter features carry earlier events' labels, so theirs
        # are updated only after scoring (else one event's label would shift
        # the whole batch's normalisation, its own score included).
        n_ctx = len(self.spec.numeric)
        self.model.norm.update(num, slice(0, n_ctx))
        logit = self.model(emb, num)
        self.recent_inputs = (emb.detach()[:1024], num[:1024])
        y, weight = torch.from_numpy(batch.label), torch.from_numpy(batch.weight)
        loss = F.binary_cross_entropy_with_logits(logit, y.to(self.device), weight=weight.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.store.apply("sparse", pulled, w.grad.cpu().numpy())
        pred = torch.sigmoid(logit).detach().cpu().numpy()
        if self.wide is not None:
            p_wide = self.wide.step(batch, self._wide_inputs(num), t_last, self.events,
                                    prefetched=(found_w, pulled_w[0]))
            both = self._blend_inputs(logit.detach(), p_wide)
            blended = self.blend(both).squeeze(1)
            pred = torch.sigmoid(blended).detach().numpy()
            self.blend_opt.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(blended, y, weight=weight).backward()
        self._dense_step(len(batch), sync)
        self.model.norm.update(num, slice(n_ctx, None))
        self.counters.update(batch, updates, self.events)
        self.store.end_batch(tag)
        self.events += len(batch)
        self._end_round(t_last)
        return StepResult(pred.astype(np.float32), batch.label, float(loss.detach()), num.cpu().numpy())

    def idle_step(self, sync: DenseSync) -> None:
        """A round without events of this worker's own: it still takes part in the
        dense reduction (and steps with its peers' gradients)."""
        for p in self.dense_params():
            p.grad = torch.zeros_like(p)
        self._dense_step(0, sync)
        self._end_round(None)

    def _dense_step(self, n_events: int, sync: DenseSync | None) -> None:
        if sync is not None and not sync.reduce_grads(self.dense_params(), n_events):
            return
        self.opt.step()
        if self.wide is not None:
            self.blend_opt.step()

    def _end_round(self, ts: float | None) -> None:
        self.batches += 1
        if self.cfg.ttl_events is not None and self.expires and self.batches % self.cfg.expire_every == 0:
            self.store.expire(ts or 0.0, self.events)

    @torch.no_grad()
    def predict(self, batch: Batch, online: bool = False) -> np.ndarray:
        """Probabilities without learning. ``online`` lets counter features see
        earlier events of this batch (progressive scoring by a model that keeps
        up); a frozen model scores with ``online=False``."""
        emb, num, p_wide = self.ranking_inputs(batch, online)
        return self.blend_probs(self.model(emb, num), p_wide)

    @torch.no_grad()
    def ranking_inputs(self, batch: Batch, online: bool = False) -> tuple[torch.Tensor, torch.Tensor, np.ndarray | None]:
        """Everything per-id a score needs, read from the store now: the dense
        tower's inputs (emb, num) and the wide part's probability (None without
        one). Serving sends (emb, num) to the tower wherever it runs (Triton)."""
        torch.set_num_threads(self.cfg.threads)
        num, _ = self._numeric(batch, online=online)
        keys, spans = self.field_keys(batch)
        emb, _ = self._pool(batch, self.store.fetch("sparse", keys), spans, grad=False)
        p_wide = None if self.wide is None else self.wide.predict(batch, self._wide_inputs(num))
        return emb, num, p_wide

    @torch.no_grad()
    def blend_probs(self, deep_logit: torch.Tensor, p_wide: np.ndarray | None) -> np.ndarray:
        """Probabilities from the dense tower's logits and the wide part's probabilities."""
        if p_wide is not None:
            deep_logit = self.blend(self._blend_inputs(deep_logit, p_wide)).squeeze(1)
        return torch.sigmoid(deep_logit).cpu().numpy()

    def frozen_copy(self) -> "OnlineLearner":
        """An independent copy of all state: rows, counters, dense weights, statistics."""
        self._local_store()  # a sharded learner's copy is a snapshot of its shards
        return copy.deepcopy(self)
