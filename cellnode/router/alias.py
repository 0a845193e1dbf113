"""Aliases as the front routes them: which node takes a request, shadow copies, and the error watch for rollback.

The choices are pure functions of the alias's shares, which nodes serve now, and an injected random source (or the
request's route key), so that tests pin them with fixed seeds. The front keeps one `AliasRoute` per alias and
replaces it whole on an update (one dict assignment); a request that picked its node keeps it to the end.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PREFIX = "datasphere.user"
MIRROR_RECORDS = 50  # the latest mirrored requests an alias keeps for `alias get`
ROLLBACK_EVENTS = 20  # the latest automatic rollbacks kept on the alias


@dataclass(frozen=True)
class Share:
    """A node's percentage of an alias's requests (or, for a mirror, of the requests copied to it)."""

    node_id: str
    percent: int


def serving_shares(shares: Sequence[Share], serving: Callable[[str], bool]) -> list[Share]:
    """The shares that take requests now: positive, and of nodes that serve. The weights are not rescaled: a choice
    in proportion to them spreads the shares of the other nodes over these, each in proportion to its own."""
    return [share for share in shares if share.percent > 0 and serving(share.node_id)]


def pick(shares: Sequence[Share], serving: Callable[[str], bool], random: Callable[[], float]) -> str | None:
    """A node at random, weighted by its share, among those that serve; None when none does.

    `random` returns a float in [0, 1), as `random.Random().random`.
    """
    eligible = serving_shares(shares, serving)
    total = sum(share.percent for share in eligible)
    if not total:
        return None
    point = random() * total
    for share in eligible:
        point -= share.percent
        if point < 0:
            return share.node_id
    return eligible[-1].node_id  # only reached through float rounding at the very top


def pick_sticky(shares: Sequence[Share], serving: Callable[[str], bool], key: bytes) -> str | None:
    """The node for a route key: weighted rendezvous hashing over the nodes that serve; None when none does.

    Each node scores `weight / -ln(u)`, with `u` in (0, 1) from a hash of the key and the node; the highest wins.
    A node wins a key with probability proportional to its weight, and the same key always wins on the same node
    while the weights stay. A change moves few keys: when a node stops serving, only its keys go elsewhere; when
    shares change, a key only leaves a node whose share shrank or goes to a node whose share grew (with two nodes, a
    canary's keys only move onto the node that grew).
    """
    best, best_score = None, -1.0
    for share in serving_shares(shares, serving):
        digest = hashlib.blake2b(key, digest_size=8, key=share.node_id.encode()[:64]).digest()
        unit = (int.from_bytes(digest, "big") + 0.5) / 2**64
        score = share.percent / -math.log(unit)
        if score > best_score:
            best, best_score = share.node_id, score
    return best


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Integers proportional to `weights` that sum to `total` (largest remainders); `weights` must not all be 0."""
    whole = sum(weights)
    exact = [total * weight / whole for weight in weights]
    result = [math.floor(value) for value in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (result[i] - exact[i], i))
    for index in by_remainder[: total - sum(result)]:
        result[index] += 1
    return result


def shift_away(
    shares: Sequence[Share], node_id: str, eligible: Callable[[str], bool] = lambda _node_id: True
) -> list[Share] | None:
    """The shares with `node_id`'s share moved to the other nodes that are `eligible`: in proportion to their
    shares, or evenly when none of them has one (so that a canary at 100 % rolls back to the version kept at 0 %).
    Nodes not eligible keep their shares. None when no other node is eligible."""
    others = [share for share in shares if share.node_id != node_id and eligible(share.node_id)]
    if not others:
        return None
    moved = sum(share.percent for share in shares if share.node_id == node_id)
    weights = [float(share.percent) for share in others]
    if not any(weights):
        weights = [1.0] * len(others)
    gains = dict(zip((share.node_id for share in others), apportion(moved, weights), strict=True))
    return [
        Share(share.node_id, 0 if share.node_id == node_id else share.percent + gains.get(share.node_id, 0))
        for share in shares
    ]


@dataclass(frozen=True)
class RollbackPolicy:
    """Take a node out of its alias when its error rate over `window` seconds passes `error_rate`, once it has
    answered at least `min_requests` requests in that window."""

    error_rate: float
    window: float
    min_requests: int = 10


class ErrorWindow:
    """Requests and errors of one node per second, over a sliding window; O(1) to record and to read."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._seconds: deque[list[int]] = deque()  # [second, requests, errors], oldest first
        self.requests = self.errors = 0

    def record(self, is_error: bool, now: float) -> None:
        second = int(now)
        self._expire(second)
        if not self._seconds or self._seconds[-1][0] != second:
            self._seconds.append([second, 0, 0])
        bucket = self._seconds[-1]
        bucket[1] += 1
        self.requests += 1
        if is_error:
            bucket[2] += 1
            self.errors += 1

    def rate(self, now: float) -> float:
        self._expire(int(now))
        return self.errors / self.requests if self.requests else 0.0

    def _expire(self, second: int) -> None:
        oldest = second - math.ceil(self.window)
        while self._seconds and self._seconds[0][0] <= oldest:
            _, requests, errors = self._seconds.popleft()
            self.requests -= requests
            self.errors -= errors


@dataclass
class MirrorRecord:
    """One mirrored request: how the shadow's answer compared with the primary's, and how long each took."""

    at: float  # Unix time
    request_id: str
    primary_node_id: str
    shadow_node_id: str
    result: str  # "agree", "differ" or "error" (the shadow could not answer: unavailable, busy, refused the input)
    primary_code: int
    shadow_code: int
    primary_ms: float
    shadow_ms: float
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class MirrorTotals:
    requests: int = 0
    agree: int = 0
    differ: int = 0
    error: int = 0
    primary_ms: float = 0.0
    shadow_ms: float = 0.0


class AliasStats:
    """What an alias has seen on this server: mirror comparisons and per-node error windows. It outlives route
    swaps (an update keeps it), so that an update does not reset the watch."""

    def __init__(self) -> None:
        self.mirrors: dict[str, MirrorTotals] = {}  # shadow node ID -> totals
        self.records: deque[MirrorRecord] = deque(maxlen=MIRROR_RECORDS)
        self.windows: dict[str, ErrorWindow] = {}
        self.rolling_back: set[str] = set()  # node IDs whose rollback is being decided or written
        self.rolled_back_at: dict[str, float] = {}  # node ID -> monotonic time of its last rollback

    def add_mirror(self, record: MirrorRecord) -> None:
        totals = self.mirrors.setdefault(record.shadow_node_id, MirrorTotals())
        totals.requests += 1
        setattr(totals, record.result, getattr(totals, record.result) + 1)
        totals.primary_ms += record.primary_ms
        totals.shadow_ms += record.shadow_ms
        self.records.append(record)

    def outcome(self, policy: RollbackPolicy | None, node_id: str, is_error: bool, now: float) -> float | None:
        """Count a node's answer; the error rate when it calls for a rollback (once per node until it is done)."""
        if policy is None:
            return None
        window = self.windows.get(node_id)
        if window is None or window.window != policy.window:
            window = self.windows[node_id] = ErrorWindow(policy.window)
        window.record(is_error, now)
        if not is_error or node_id in self.rolling_back or window.requests < policy.min_requests:
            return None
        rate = window.rate(now)
        if rate <= policy.error_rate:
            return None
        self.rolling_back.add(node_id)
        return rate

    def forget(self, node_id: str) -> None:
        """After a rollback: the node starts a clean window if its owner sends it traffic again."""
        self.windows.pop(node_id, None)
        self.rolling_back.discard(node_id)

    def may_take_over(self, policy: RollbackPolicy, node_id: str, now: float) -> bool:
        """Whether a node may take a rolled-back node's share, as far as its own record goes: not rolled back itself
        within the window (no flip-flop between two failing versions), and within the error limit."""
        if now - self.rolled_back_at.get(node_id, -math.inf) < policy.window:
            return False
        window = self.windows.get(node_id)
        return window is None or window.rate(now) <= policy.error_rate


@dataclass
class AliasRoute:
    """One alias as the front routes it. Replaced whole on a change; `stats` carries over."""

    alias_id: str
    name: str  # the routing name, `<prefix>.<name>`
    folder_id: str
    public: bool
    acl: frozenset[str]
    shares: tuple[Share, ...]
    mirrors: tuple[Share, ...] = ()
    rollback: RollbackPolicy | None = None
    version: int = 1
    stats: AliasStats = field(default_factory=AliasStats)
    # Shares changed by an automatic rollback that the store does not have yet: a reload of the same version must
    # not bring the failing node back.
    pending_rollback: bool = False

    def node_ids(self) -> list[str]:
        return [share.node_id for share in (*self.shares, *self.mirrors)]
