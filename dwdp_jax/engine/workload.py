"""Requests and synthetic workloads: lengths, rank imbalance, arrivals, and JSONL traces.

A workload is a list of `Request`s, generated reproducibly from a `WorkloadSpec` (one seed decides every
length, rank, arrival time and prompt token) and saved as a JSONL trace, one request per line. Prompts drawn
by the generator are stored as (seed, length, vocab size) and regenerated exactly on load; any other prompt
is stored as its token list.

The paper's setting is `WorkloadSpec(num_requests, FixedLength(8192), FixedLength(1024))`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np


class RequestError(ValueError):
    """A request cannot be served (empty prompt, too long for the cache, ...); the message says why."""


@dataclasses.dataclass(frozen=True)
class PromptSource:
    """Provenance of a synthetic prompt: `prompt == synthetic_prompt(seed, len(prompt), vocab_size)`."""

    seed: int
    vocab_size: int


def synthetic_prompt(seed: int, length: int, vocab_size: int) -> np.ndarray:
    """Prompt token ids drawn uniformly from [0, vocab_size). Returns int32 [length]."""
    return np.random.default_rng(seed).integers(0, vocab_size, size=length, dtype=np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Request:
    """One generation request.

    prompt: int32 [prompt_len] token ids (a list is converted; the array is made read-only).
    max_new_tokens: output tokens to generate, the first one included (produced by the prefill).
    arrival_s: seconds since the start of the run at which the request may be admitted.
    rank: the data-parallel rank that serves it; None when not pinned.
    source: set by the generator so that traces store the prompt as a seed.
    Construction only normalizes types; `validate_request` decides whether it can be served.
    """

    request_id: str
    prompt: np.ndarray
    max_new_tokens: int
    arrival_s: float = 0.0
    rank: int | None = None
    source: PromptSource | None = None

    def __post_init__(self):
        prompt = np.asarray(self.prompt)
        if prompt.ndim != 1:
            raise RequestError(f"request {self.request_id!r}: prompt must be 1-D, got shape {prompt.shape}")
        if prompt.size and not np.issubdtype(prompt.dtype, np.integer):
            raise RequestError(f"request {self.request_id!r}: prompt must hold integer token ids, got {prompt.dtype}")
        prompt = prompt.astype(np.int32)  # always a copy: the caller's buffer stays theirs
        prompt.setflags(write=False)
        object.__setattr__(self, "prompt", prompt)

    @property
    def prompt_len(self) -> int:
        return int(self.prompt.shape[0])

    def __eq__(self, other):
        if not isinstance(other, Request):
            return NotImplemented
        return (
            (self.request_id, self.max_new_tokens, self.arrival_s, self.rank, self.source)
            == (other.request_id, other.max_new_tokens, other.arrival_s, other.rank, other.source)
            and np.array_equal(self.prompt, other.prompt)
        )

    __hash__ = None


def validate_request(req: Request, max_seq_len: int, vocab_size: int | None = None) -> None:
    """Raises `RequestError` if `req` cannot be served by a cache slot of `max_seq_len` tokens.

    A slot must hold the prompt and every output token: prompt_len + max_new_tokens <= max_seq_len.
    """
    rid = req.request_id
    if not isinstance(rid, str) or not rid:
        raise RequestError(f"request_id must be a non-empty string, got {rid!r}")
    if req.prompt_len == 0:
        raise RequestError(f"request {rid!r}: empty prompt")
    if isinstance(req.max_new_tokens, bool) or not isinstance(req.max_new_tokens, (int, np.integer)):
        raise RequestError(f"request {rid!r}: max_new_tokens must be an int, got {req.max_new_tokens!r}")
    if req.max_new_tokens <= 0:
        raise RequestError(f"request {rid!r}: max_new_tokens must be > 0, got {req.max_new_tokens}")
    total = req.prompt_len + int(req.max_new_tokens)
    if total > max_seq_len:
        raise RequestError(
            f"request {rid!r}: prompt ({req.prompt_len}) + max_new_tokens ({req.max_new_tokens}) = {total} "
            f"tokens exceeds the cache slot (max_seq_len={max_seq_len})"
        )
    if not (math.isfinite(req.arrival_s) and req.arrival_s >= 0):
        raise RequestError(f"request {rid!r}: arrival_s must be finite and >= 0, got {req.arrival_s}")
    if req.rank is not None and req.rank < 0:
        raise RequestError(f"request {rid!r}: rank must be >= 0 or None, got {req.rank}")
    if vocab_size is not None:
        lo, hi = int(req.prompt.min()), int(req.prompt.max())
        if lo < 0 or hi >= vocab_size:
            raise RequestError(f"request {rid!r}: token ids span [{lo}, {hi}], outside vocab [0, {vocab_size})")


# ---------------------------------------------------------------------------------------------------------------
# Length distributions


@dataclasses.dataclass(frozen=True)
class FixedLength:
    """Every request has `value` tokens."""

    value: int

    def __post_init__(self):
        if self.value <= 0:
            raise ValueError(f"FixedLength.value must be > 0, got {self.value}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Returns int64 [n]."""
        return np.full(n, self.value, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class LognormalLength:
    """round(median * exp(sigma * z)), z ~ N(0, 1), clipped to [min_len, max_len] (the median is preserved)."""

    median: float
    sigma: float
    min_len: int = 1
    max_len: int = 1 << 20

    def __post_init__(self):
        if self.median <= 0 or self.sigma < 0:
            raise ValueError(f"LognormalLength needs median > 0 and sigma >= 0, got {self.median}, {self.sigma}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"LognormalLength needs 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Returns int64 [n]."""
        raw = self.median * np.exp(self.sigma * rng.standard_normal(n))
        return np.clip(np.rint(raw), self.min_len, self.max_len).astype(np.int64)


LengthDist = FixedLength | LognormalLength


# ---------------------------------------------------------------------------------------------------------------
# Rank imbalance


@dataclasses.dataclass(frozen=True)
class RankSplit:
    """How requests are spread over `num_ranks` data-parallel ranks.

    Each rank gets a relative load (`loads`):
      * "balanced": all 1.
      * "hot": rank `hot_rank` has `factor`, the others 1 (one rank gets `factor` x the tokens of each other).
      * "dirichlet": Dirichlet(`alpha`) shares drawn from the workload seed, scaled to mean 1.
      * "zipf": 1 / (r + 1) ** `zipf_s`, scaled to mean 1.
    The load is realized by `mode`:
      * "requests": rank r serves a share load_r / sum(load) of the requests (lengths are drawn independently
        of the rank, so its expected token share is the same).
      * "length": every rank serves the same number of requests, and rank r's prompt lengths are multiplied by
        load_r (outputs unchanged).
    """

    num_ranks: int = 1
    kind: Literal["balanced", "hot", "dirichlet", "zipf"] = "balanced"
    mode: Literal["requests", "length"] = "requests"
    factor: float = 2.0
    hot_rank: int = 0
    alpha: float = 1.0
    zipf_s: float = 1.0

    def __post_init__(self):
        if self.num_ranks < 1:
            raise ValueError(f"RankSplit.num_ranks must be >= 1, got {self.num_ranks}")
        if self.kind not in ("balanced", "hot", "dirichlet", "zipf"):
            raise ValueError(f"RankSplit.kind: unknown {self.kind!r}")
        if self.mode not in ("requests", "length"):
            raise ValueError(f"RankSplit.mode: unknown {self.mode!r}")
        if self.factor <= 0 or self.alpha <= 0 or self.zipf_s < 0:
            raise ValueError("RankSplit needs factor > 0, alpha > 0, zipf_s >= 0")
        if not 0 <= self.hot_rank < self.num_ranks:
            raise ValueError(f"RankSplit.hot_rank {self.hot_rank} outside [0, {self.num_ranks})")

    def loads(self, rng: np.random.Generator) -> np.ndarray:
        """Relative load per rank, float64 [num_ranks] (see the class docstring)."""
        r = self.num_ranks
        if self.kind == "balanced":
            return np.ones(r)
        if self.kind == "hot":
            loads = np.ones(r)
            loads[self.hot_rank] = self.factor
            return loads
        if self.kind == "dirichlet":
            shares = rng.dirichlet(np.full(r, self.alpha))
        else:
            shares = 1.0 / np.arange(1, r + 1) ** self.zipf_s
        return shares * (r / shares.sum())


def apportion(n: int, weights: np.ndarray) -> np.ndarray:
    """Splits n items by `weights` [R] with the largest-remainder method. Returns int64 [R] summing to n."""
    w = np.asarray(weights, dtype=np.float64)
    exact = n * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    leftover = n - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")  # ties go to the lower rank
    counts[order[:leftover]] += 1
    return counts


# ---------------------------------------------------------------------------------------------------------------
# Workload generation


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    """A reproducible synthetic workload: the same spec always yields the same requests.

    arrival_rate_rps: Poisson arrivals over all ranks together (requests/s); None: every request arrives at
      t=0, which is an offline batch, or a closed loop when run with `run_engine(..., concurrency=C)`.
    """

    num_requests: int
    input_len: LengthDist = FixedLength(8192)
    output_len: LengthDist = FixedLength(1024)
    vocab_size: int = 129280
    split: RankSplit = RankSplit()
    arrival_rate_rps: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.num_requests < 0:
            raise ValueError(f"WorkloadSpec.num_requests must be >= 0, got {self.num_requests}")
        if self.vocab_size < 1:
            raise ValueError(f"WorkloadSpec.vocab_size must be >= 1, got {self.vocab_size}")
        if self.arrival_rate_rps is not None and not self.arrival_rate_rps > 0:
            raise ValueError(f"WorkloadSpec.arrival_rate_rps must be > 0 or None, got {self.arrival_rate_rps}")


def generate(spec: WorkloadSpec) -> list[Request]:
    """The requests of `spec`, in arrival order, ids "r000000", "r000001", ...; rank None when num_ranks == 1."""
    n, num_ranks = spec.num_requests, spec.split.num_ranks
    rng = np.random.default_rng(spec.seed)
    loads = spec.split.loads(rng)
    input_lens = spec.input_len.sample(rng, n)
    output_lens = spec.output_len.sample(rng, n)
    weights = loads if spec.split.mode == "requests" else np.ones(num_ranks)
    ranks = rng.permutation(np.repeat(np.arange(num_ranks), apportion(n, weights)))
    if spec.split.mode == "length":
        input_lens = np.maximum(1, np.rint(input_lens * loads[ranks])).astype(np.int64)
    if spec.arrival_rate_rps is None:
        arrivals = np.zeros(n)
    else:
        arrivals = np.cumsum(rng.exponential(1.0 / spec.arrival_rate_rps, size=n))
    prompt_seeds = np.random.SeedSequence(spec.seed).spawn(n)
    requests = []
    for i in range(n):
        seed = int(prompt_seeds[i].generate_state(1)[0])
        requests.append(
            Request(
                request_id=f"r{i:06d}",
                prompt=synthetic_prompt(seed, int(input_lens[i]), spec.vocab_size),
                max_new_tokens=int(output_lens[i]),
                arrival_s=float(arrivals[i]),
                rank=int(ranks[i]) if num_ranks > 1 else None,
                source=PromptSource(seed, spec.vocab_size),
            )
        )
    return requests


def split_by_rank(requests: Iterable[Request], num_ranks: int) -> list[list[Request]]:
    """Requests per rank, order kept. Unpinned requests (rank None) go round-robin over the ranks."""
    per_rank: list[list[Request]] = [[] for _ in range(num_ranks)]
    next_rank = 0
    for req in requests:
        if req.rank is None:
            per_rank[next_rank].append(req)
            next_rank = (next_rank + 1) % num_ranks
        elif 0 <= req.rank < num_ranks:
            per_rank[req.rank].append(req)
        else:
            raise RequestError(f"request {req.request_id!r}: rank {req.rank} outside [0, {num_ranks})")
    return per_rank


# ---------------------------------------------------------------------------------------------------------------
# JSONL traces


def _to_line(req: Request) -> dict:
    line = {
        "request_id": req.request_id,
        "max_new_tokens": int(req.max_new_tokens),
        "arrival_s": float(req.arrival_s),
        "rank": req.rank,
        "prompt_len": req.prompt_len,
    }
    src = req.source
    if src is not None and np.array_equal(req.prompt, synthetic_prompt(src.seed, req.prompt_len, src.vocab_size)):
        line["prompt_seed"] = src.seed
        line["vocab_size"] = src.vocab_size
    else:
        line["prompt"] = req.prompt.tolist()
    return line


def _from_line(line: dict) -> Request:
    if "prompt_seed" in line:
        source = PromptSource(int(line["prompt_seed"]), int(line["vocab_size"]))
        prompt = synthetic_prompt(source.seed, int(line["prompt_len"]), source.vocab_size)
    else:
        source = None
        prompt = np.asarray(line["prompt"], dtype=np.int32)
        if prompt.shape[0] != line["prompt_len"]:
            raise ValueError(f"trace line {line['request_id']!r}: prompt_len does not match the token list")
    return Request(
        request_id=line["request_id"],
        prompt=prompt,
        max_new_tokens=int(line["max_new_tokens"]),
        arrival_s=float(line["arrival_s"]),
        rank=line["rank"],
        source=source,
    )


def save_trace(path: str | os.PathLike, requests: Sequence[Request]) -> None:
    """Writes one JSON object per request. Float arrival times round-trip exactly (repr precision)."""
    with open(path, "w") as f:
        for req in requests:
            f.write(json.dumps(_to_line(req)) + "\n")


def load_trace(path: str | os.PathLike) -> list[Request]:
    """Reads a trace written by `save_trace`; prompts are exactly the saved tokens."""
    with open(path) as f:
        return [_from_line(json.loads(text)) for text in f if text.strip()]
