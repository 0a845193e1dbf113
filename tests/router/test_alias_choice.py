from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction

import pytest

from cellnode.exceptions import NotFound
from cellnode.router.alias import (
    DEFAULT_PREFIX,
    MIRROR_RECORDS,
    AliasRoute,
    AliasStats,
    ErrorWindow,
    MirrorRecord,
    RollbackPolicy,
    Share,
    apportion,
    pick,
    pick_sticky,
    serving_shares,
    shift_away,
)
from cellnode.router.table import RoutingTable

SEED = 20240611
DRAWS = 20_000
KEYS = 20_000
SIGMAS = 5  # a seeded run either passes or fails for good; 5 sigma keeps a correct split far from the edge


def shares_of(percents: dict[str, int]) -> list[Share]:
    return [Share(node_id, percent) for node_id, percent in percents.items()]


def everyone(node_id: str) -> bool:
    return True


def all_but(*down: str) -> Callable[[str], bool]:
    return lambda node_id: node_id not in down


def route_keys(count: int = KEYS) -> list[bytes]:
    rng = random.Random(SEED)
    return [rng.randbytes(16) for _ in range(count)]


def assert_binomial(count: int, trials: int, p: float, what: str) -> None:
    """`count` successes out of `trials` is within SIGMAS standard deviations of a Binomial(trials, p)."""
    expected = trials * p
    sigma = math.sqrt(trials * p * (1 - p))
    assert abs(count - expected) <= SIGMAS * sigma, (
        f"{what}: got {count} of {trials}, expected {expected:.0f} +- {SIGMAS * sigma:.0f} (p={p})"
    )


def assert_split(counts: Counter[str | None], trials: int, percents: Mapping[str, int]) -> None:
    total = sum(percents.values())
    assert set(counts) <= {node_id for node_id, percent in percents.items() if percent > 0}, counts
    for node_id, percent in percents.items():
        assert_binomial(counts[node_id], trials, percent / total, f"node {node_id!r} of {percents}")


# pick


WEIGHT_SETS = [
    {"a": 90, "b": 10},
    {"a": 50, "b": 30, "c": 20},
    {"a": 1, "b": 99},
    {"z": 0, "a": 70, "y": 0, "b": 30},
]


@pytest.mark.parametrize("percents", WEIGHT_SETS, ids=lambda percents: "/".join(map(str, percents.values())))
def test_pick_follows_the_weights(percents: dict[str, int]) -> None:
    draw = random.Random(SEED).random
    shares = shares_of(percents)
    counts = Counter(pick(shares, everyone, draw) for _ in range(DRAWS))
    assert_split(counts, DRAWS, percents)


def test_pick_spreads_a_down_node_over_the_others_by_weight() -> None:
    draw = random.Random(SEED).random
    shares = shares_of({"a": 50, "b": 30, "c": 20})
    counts = Counter(pick(shares, all_but("a"), draw) for _ in range(DRAWS))
    assert_split(counts, DRAWS, {"a": 0, "b": 60, "c": 40})


def test_pick_never_chooses_a_zero_percent_node_even_at_the_edges() -> None:
    shares = shares_of({"z": 0, "a": 60, "y": 0, "b": 40, "x": 0})
    assert pick(shares, everyone, lambda: 0.0) == "a"
    assert pick(shares, everyone, lambda: math.nextafter(1.0, 0.0)) == "b"
    # The boundary between a and b: [0, 0.6) is a's.
    assert pick(shares, everyone, lambda: 0.6) == "b"
    assert pick(shares, everyone, lambda: math.nextafter(0.6, 0.0)) == "a"


def test_pick_returns_none_when_nothing_serves() -> None:
    shares = shares_of({"a": 90, "b": 10})
    assert pick(shares, lambda node_id: False, random.Random(SEED).random) is None
    assert pick([], everyone, random.Random(SEED).random) is None


def test_pick_returns_none_when_only_zero_percent_nodes_serve() -> None:
    shares = shares_of({"a": 100, "z": 0, "y": 0})
    assert pick(shares, all_but("a"), random.Random(SEED).random) is None
    assert serving_shares(shares, all_but("a")) == []


def test_pick_is_deterministic_for_a_seed() -> None:
    shares = shares_of({"a": 90, "b": 10})
    draw_one, draw_two = random.Random(SEED).random, random.Random(SEED).random
    one = [pick(shares, everyone, draw_one) for _ in range(200)]
    two = [pick(shares, everyone, draw_two) for _ in range(200)]
    assert one == two
    # The exact picks: a for a draw below 0.9, b above.
    reference = random.Random(SEED)
    assert one == ["a" if reference.random() < 0.9 else "b" for _ in range(200)]
    assert set(one) == {"a", "b"}


# pick_sticky


def sticky_map(shares: Sequence[Share], serving: Callable[[str], bool], keys: Sequence[bytes]) -> list[str | None]:
    return [pick_sticky(shares, serving, key) for key in keys]


def test_pick_sticky_gives_the_same_node_for_the_same_key() -> None:
    shares = shares_of({"a": 50, "b": 30, "c": 20})
    keys = route_keys(500)
    first = sticky_map(shares, everyone, keys)
    assert sticky_map(shares, everyone, keys) == first
    # A route rebuilt with its shares in another order keeps every key where it was.
    assert sticky_map(list(reversed(shares)), everyone, keys) == first
    assert pick_sticky(shares, everyone, b"user-42") == pick_sticky(shares, everyone, b"user-42")


@pytest.mark.parametrize("percents", WEIGHT_SETS, ids=lambda percents: "/".join(map(str, percents.values())))
def test_pick_sticky_splits_keys_by_weight(percents: dict[str, int]) -> None:
    counts = Counter(sticky_map(shares_of(percents), everyone, route_keys()))
    assert_split(counts, KEYS, percents)


def test_pick_sticky_returns_none_when_nothing_serves() -> None:
    shares = shares_of({"a": 100, "z": 0})
    assert pick_sticky(shares, all_but("a"), b"key") is None
    assert pick_sticky(shares, lambda node_id: False, b"key") is None
    assert pick_sticky([], everyone, b"key") is None


def test_pick_sticky_moves_only_the_keys_of_a_node_that_stops_serving() -> None:
    shares = shares_of({"a": 50, "b": 30, "c": 20})
    keys = route_keys()
    before = sticky_map(shares, everyone, keys)
    after = sticky_map(shares, all_but("c"), keys)
    moved: Counter[str | None] = Counter()
    for old, new in zip(before, after, strict=True):
        if old != "c":
            assert new == old, "a key on a node that still serves moved"
        else:
            moved[new] += 1
    assert set(moved) == {"a", "b"}
    # c's keys spread over a and b in proportion 50:30.
    assert_binomial(moved["a"], sum(moved.values()), 50 / 80, "c's keys that went to a")


def test_pick_sticky_moves_keys_only_to_the_node_whose_share_grew() -> None:
    keys = route_keys()
    before = sticky_map(shares_of({"a": 90, "b": 10}), everyone, keys)
    after = sticky_map(shares_of({"a": 80, "b": 20}), everyone, keys)
    moves = Counter((old, new) for old, new in zip(before, after, strict=True) if old != new)
    assert set(moves) == {("a", "b")}
    # The least that can move: the 10 % that b gained.
    assert_binomial(moves["a", "b"], KEYS, 0.10, "keys moved from a to b")


def test_pick_sticky_three_nodes_keys_only_move_to_the_growing_node_when_the_others_keep_their_ratio() -> None:
    keys = route_keys()
    before = sticky_map(shares_of({"a": 60, "b": 30, "c": 10}), everyone, keys)
    after = sticky_map(shares_of({"a": 54, "b": 27, "c": 19}), everyone, keys)
    moves = Counter((old, new) for old, new in zip(before, after, strict=True) if old != new)
    assert {new for _, new in moves} == {"c"}
    assert_binomial(sum(moves.values()), KEYS, 0.09, "keys moved to c")


def test_pick_sticky_moves_keys_only_off_a_shrunk_node_or_onto_a_grown_one() -> None:
    """60/30/10 -> 50/30/20: b keeps its share, yet a's loss sends some of a's keys to b (a's scores fell). What
    rendezvous hashing promises, and the docs say: a key leaves a node only if that node shrank or goes to one that
    grew; none moves off b except onto c."""
    keys = route_keys()
    before = sticky_map(shares_of({"a": 60, "b": 30, "c": 10}), everyone, keys)
    after = sticky_map(shares_of({"a": 50, "b": 30, "c": 20}), everyone, keys)
    moves = Counter((old, new) for old, new in zip(before, after, strict=True) if old != new)
    assert all(old == "a" or new == "c" for old, new in moves), moves
    assert ("b", "a") not in moves and ("c", "a") not in moves and ("c", "b") not in moves
    assert moves[("a", "c")] and moves[("b", "c")]  # c grew, so it takes keys from both


def test_pick_sticky_gives_zero_percent_nodes_no_keys() -> None:
    shares = shares_of({"z": 0, "a": 100, "y": 0})
    assert set(sticky_map(shares, everyone, route_keys(2000))) == {"a"}


# apportion


@pytest.mark.parametrize(
    ("total", "weights", "expected"),
    [
        (100, [1, 1, 1], [34, 33, 33]),
        (10, [1, 2, 3, 4], [1, 2, 3, 4]),
        (100, [0.1, 0.2, 0.7], [10, 20, 70]),
        (100, [60, 30], [67, 33]),
        (100, [0, 5, 0], [0, 100, 0]),
        (0, [3, 1], [0, 0]),
        (7, [1], [7]),
    ],
)
def test_apportion_examples(total: int, weights: list[float], expected: list[int]) -> None:
    assert apportion(total, weights) == expected


def test_apportion_is_exact_and_proportional_over_random_weights() -> None:
    rng = random.Random(SEED)
    for _ in range(2000):
        count = rng.randint(1, 8)
        weights = [rng.choice([0, 0, rng.randint(1, 100)]) for _ in range(count)]
        if not any(weights):
            weights[rng.randrange(count)] = rng.randint(1, 100)
        total = rng.choice([1, 3, 7, 100, 1000])
        result = apportion(total, weights)
        context = f"apportion({total}, {weights}) = {result}"
        assert sum(result) == total, context
        exact = [Fraction(total * weight, sum(weights)) for weight in weights]
        for value, share in zip(result, exact, strict=True):
            assert math.floor(share) <= value <= math.ceil(share), context
        # Largest remainders: every one rounded up had at least the remainder of every one rounded down.
        up = [share - math.floor(share) for value, share in zip(result, exact, strict=True) if value > share]
        down = [share - math.floor(share) for value, share in zip(result, exact, strict=True) if value < share]
        if up and down:
            assert min(up) >= max(down), context


def test_apportion_keeps_float_weights_in_proportion() -> None:
    rng = random.Random(SEED)
    for _ in range(1000):
        weights = [rng.random() for _ in range(rng.randint(1, 6))]
        result = apportion(100, weights)
        assert sum(result) == 100, weights
        for value, weight in zip(result, weights, strict=True):
            assert abs(value - 100 * weight / sum(weights)) < 1, (weights, result)


# shift_away


def test_shift_away_rolls_a_canary_back_to_the_other_node() -> None:
    assert shift_away(shares_of({"a": 90, "b": 10}), "b") == shares_of({"a": 100, "b": 0})


def test_shift_away_rolls_a_full_canary_back_to_a_zero_percent_node() -> None:
    assert shift_away(shares_of({"a": 0, "b": 100}), "b") == shares_of({"a": 100, "b": 0})


def test_shift_away_spreads_evenly_over_zero_percent_nodes() -> None:
    moved = shift_away(shares_of({"a": 0, "b": 0, "c": 0, "d": 100}), "d")
    assert moved is not None
    assert [share.node_id for share in moved] == ["a", "b", "c", "d"]
    assert sorted(share.percent for share in moved) == [0, 33, 33, 34]
    assert moved[-1] == Share("d", 0)


def test_shift_away_moves_in_proportion_to_the_others() -> None:
    assert shift_away(shares_of({"a": 60, "b": 30, "c": 10}), "c") == shares_of({"a": 67, "b": 33, "c": 0})
    assert shift_away(shares_of({"a": 50, "b": 0, "c": 50}), "a") == shares_of({"a": 0, "b": 0, "c": 100})


def test_shift_away_a_single_node_gives_none() -> None:
    assert shift_away(shares_of({"a": 100}), "a") is None


def test_shift_away_always_sums_to_100() -> None:
    rng = random.Random(SEED)
    for _ in range(1000):
        count = rng.randint(2, 6)
        cuts = sorted(rng.randint(0, 100) for _ in range(count - 1))
        percents = [high - low for low, high in zip([0, *cuts], [*cuts, 100], strict=True)]
        shares = [Share(f"n{i}", percent) for i, percent in enumerate(percents)]
        victim = rng.choice(shares)
        moved = shift_away(shares, victim.node_id)
        assert moved is not None
        context = f"shift_away({percents}, {victim.node_id!r}) = {moved}"
        assert sum(share.percent for share in moved) == 100, context
        assert [share.node_id for share in moved] == [share.node_id for share in shares], context
        for old, new in zip(shares, moved, strict=True):
            if old.node_id == victim.node_id:
                assert new.percent == 0, context
            else:
                assert new.percent >= old.percent, context


# ErrorWindow


def test_error_window_counts_expire_after_the_window() -> None:
    window = ErrorWindow(10)
    assert window.rate(100.0) == 0.0
    window.record(True, now=100.0)
    window.record(False, now=100.5)
    window.record(False, now=105.2)
    window.record(True, now=105.9)
    assert (window.requests, window.errors) == (4, 2)
    assert window.rate(109.99) == 0.5
    # At 110 the second 100 leaves the window: one request of two left is an error.
    assert window.rate(110.0) == 0.5
    assert (window.requests, window.errors) == (2, 1)
    window.record(False, now=112.0)
    assert window.rate(112.0) == pytest.approx(1 / 3)
    assert window.rate(115.0) == 0.0
    assert (window.requests, window.errors) == (1, 0)
    assert window.rate(200.0) == 0.0
    assert (window.requests, window.errors) == (0, 0)


def test_error_window_rate_over_many_requests() -> None:
    window = ErrorWindow(60)
    for i in range(100):
        window.record(i % 4 == 0, now=1000.0 + i * 0.5)
    assert window.requests == 100
    assert window.rate(1049.5) == 0.25
    # After a long silence the window starts over.
    window.record(True, now=5000.0)
    assert (window.requests, window.errors) == (1, 1)
    assert window.rate(5000.0) == 1.0


# AliasStats


POLICY = RollbackPolicy(error_rate=0.5, window=60, min_requests=10)


def test_outcome_waits_for_min_requests() -> None:
    stats = AliasStats()
    results = [stats.outcome(POLICY, "a", True, now=100.0 + i) for i in range(9)]
    assert results == [None] * 9
    assert stats.outcome(POLICY, "a", True, now=109.0) == 1.0


def test_outcome_signals_once_when_the_rate_passes_the_policy() -> None:
    stats = AliasStats()
    for i in range(5):
        assert stats.outcome(POLICY, "a", False, now=100.0 + i) is None
        assert stats.outcome(POLICY, "a", True, now=100.0 + i) is None  # at most 0.5, not above it
    assert stats.outcome(POLICY, "a", False, now=106.0) is None
    assert stats.outcome(POLICY, "a", True, now=107.0) is None  # 6 of 12: still 0.5
    assert stats.outcome(POLICY, "a", True, now=108.0) == pytest.approx(7 / 13)
    assert [stats.outcome(POLICY, "a", True, now=109.0) for _ in range(20)] == [None] * 20
    # Another node keeps its own window.
    assert stats.outcome(POLICY, "b", True, now=109.0) is None


def test_outcome_signals_again_only_after_forget() -> None:
    stats = AliasStats()
    signals = [stats.outcome(POLICY, "a", True, now=100.0) for _ in range(30)]
    assert [signal for signal in signals if signal is not None] == [1.0]
    stats.forget("a")
    assert "a" not in stats.windows
    # A clean window: min_requests again before the next signal.
    signals = [stats.outcome(POLICY, "a", True, now=101.0) for _ in range(10)]
    assert signals == [None] * 9 + [1.0]


def test_outcome_ignores_errors_that_left_the_window() -> None:
    stats = AliasStats()
    for _ in range(9):
        assert stats.outcome(POLICY, "a", True, now=100.0) is None
    assert stats.outcome(POLICY, "a", True, now=160.0) is None
    assert stats.windows["a"].requests == 1


def test_outcome_without_a_policy_never_signals() -> None:
    stats = AliasStats()
    assert [stats.outcome(None, "a", True, now=100.0) for _ in range(100)] == [None] * 100
    assert stats.windows == {}


def mirror_record(result: str, shadow: str = "s", primary_ms: float = 10.0, shadow_ms: float = 20.0) -> MirrorRecord:
    return MirrorRecord(
        at=1.0,
        request_id="r",
        primary_node_id="p",
        shadow_node_id=shadow,
        result=result,
        primary_code=200,
        shadow_code=200 if result != "error" else 503,
        primary_ms=primary_ms,
        shadow_ms=shadow_ms,
    )


def test_add_mirror_totals_per_shadow_and_keeps_the_latest_records() -> None:
    stats = AliasStats()
    for result in ["agree", "agree", "differ", "error"]:
        stats.add_mirror(mirror_record(result))
    stats.add_mirror(mirror_record("differ", shadow="t", primary_ms=1.0, shadow_ms=2.0))
    s, t = stats.mirrors["s"], stats.mirrors["t"]
    assert (s.requests, s.agree, s.differ, s.error) == (4, 2, 1, 1)
    assert (s.primary_ms, s.shadow_ms) == (40.0, 80.0)
    assert (t.requests, t.agree, t.differ, t.error, t.primary_ms, t.shadow_ms) == (1, 0, 1, 0, 1.0, 2.0)
    for _ in range(MIRROR_RECORDS + 5):
        stats.add_mirror(mirror_record("agree", shadow="u"))
    assert len(stats.records) == MIRROR_RECORDS
    assert all(record.shadow_node_id == "u" for record in stats.records)
    assert stats.mirrors["u"].requests == MIRROR_RECORDS + 5


# RoutingTable


def alias_route(
    alias_id: str = "al1",
    name: str = f"{DEFAULT_PREFIX}.churn",
    version: int = 1,
    shares: tuple[Share, ...] = (Share("a", 90), Share("b", 10)),
) -> AliasRoute:
    return AliasRoute(
        alias_id=alias_id, name=name, folder_id="f1", public=False, acl=frozenset(), shares=shares, version=version
    )


def test_put_alias_keeps_a_newer_version() -> None:
    table = RoutingTable()
    newer = alias_route(version=3)
    table.put_alias(newer)
    table.put_alias(alias_route(version=2))
    assert table.get_alias("churn") is newer


def test_put_alias_newer_version_keeps_the_stats() -> None:
    table = RoutingTable()
    old = alias_route(version=1)
    table.put_alias(old)
    old.stats.outcome(POLICY, "a", True, now=1.0)
    new = alias_route(version=2, shares=(Share("a", 80), Share("b", 20)))
    table.put_alias(new)
    assert table.get_alias("churn") is new
    assert new.stats is old.stats
    assert new.stats.windows["a"].errors == 1
    # The same version again (a reload) also replaces and keeps the stats.
    again = alias_route(version=2)
    table.put_alias(again)
    assert table.get_alias("churn") is again
    assert again.stats is old.stats


def test_put_alias_with_another_alias_id_replaces_the_route_and_its_stats() -> None:
    table = RoutingTable()
    old = alias_route(alias_id="al1", version=5)
    table.put_alias(old)
    replacement = alias_route(alias_id="al2", version=1)
    table.put_alias(replacement)
    assert table.get_alias("churn") is replacement
    assert replacement.stats is not old.stats


def test_get_alias_by_routing_name_and_by_bare_name() -> None:
    table = RoutingTable()
    default = alias_route()
    other = alias_route(alias_id="al2", name="team.churn")
    table.put_alias(default)
    table.put_alias(other)
    assert table.get_alias(f"{DEFAULT_PREFIX}.churn") is default
    assert table.get_alias("churn") is default
    assert table.get_alias("team.churn") is other
    assert table.find_alias("churn") is None
    table.remove_alias(f"{DEFAULT_PREFIX}.churn")
    with pytest.raises(NotFound):
        table.get_alias("churn")  # a bare name means the default prefix only


def test_get_alias_not_found_names_the_fix() -> None:
    with pytest.raises(NotFound) as info:
        RoutingTable().get_alias("missing")
    message = str(info.value)
    assert "'missing'" in message
    assert "'<prefix>.<name>'" in message
    assert f"'{DEFAULT_PREFIX}.my-alias'" in message
    assert "'cellnode alias list'" in message


# rollback eligibility, pending rollbacks and stale reloads


def test_shift_away_gives_the_share_only_to_eligible_nodes() -> None:
    shares = shares_of({"a": 60, "b": 30, "c": 10})
    moved = shift_away(shares, "c", lambda node: node != "b")
    assert moved == [Share("a", 70), Share("b", 30), Share("c", 0)]  # b keeps its share, gains nothing
    assert shift_away(shares_of({"v1": 100, "v2": 0}), "v1", lambda node: False) is None


def test_a_node_rolled_back_within_the_window_or_over_the_limit_may_not_take_over() -> None:
    stats = AliasStats()
    stats.rolled_back_at["a"] = 100.0
    assert not stats.may_take_over(POLICY, "a", 100.0 + POLICY.window - 1)
    assert stats.may_take_over(POLICY, "a", 100.0 + POLICY.window + 1)
    for _ in range(POLICY.min_requests):
        stats.outcome(POLICY, "b", True, now=200.0)
    assert not stats.may_take_over(POLICY, "b", 200.0)
    assert stats.may_take_over(POLICY, "fresh", 200.0)


def test_a_reload_of_the_same_version_does_not_undo_a_pending_rollback() -> None:
    table = RoutingTable()
    table.put_alias(alias_route(version=4))
    pending = dataclasses.replace(table.get_alias("churn"), shares=(Share("a", 100),), pending_rollback=True)
    assert table.put_alias(pending)
    assert not table.put_alias(alias_route(version=4))  # a reload that read the store before the write
    assert table.get_alias("churn") is pending
    written = alias_route(version=5, shares=(Share("a", 100),))
    assert table.put_alias(written)
    assert table.get_alias("churn") is written


def test_a_reload_that_read_the_store_before_a_change_is_dropped() -> None:
    table = RoutingTable()
    before = table.alias_changes
    table.put_alias(alias_route(alias_id="new", version=1))  # created while the reload read the store
    assert table.sync_aliases([], before) == []
    assert table.find_alias("datasphere.user.churn") is not None
    assert table.sync_aliases([], table.alias_changes) == ["datasphere.user.churn"]
