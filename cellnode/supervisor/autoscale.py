"""Autoscaling: how many instances a node with a range `min_instances`..`max_instances` should run.

The policy is concurrency-based, as Knative's: an instance serves one request at a time, so the load of a node is
the number of requests it holds (running plus waiting), sampled every second. A node should run enough instances
that each is busy `target` of the time on average:

    wanted = ceil(mean load / target), kept within min_instances..max_instances

- **Up:** the mean over the last `up_cooldown` seconds (6 by default); the count rises to `wanted` at once (a new
  instance is a fork, ready in milliseconds).
- **Down:** the mean over the last `down_cooldown` seconds (60 by default), so that a short lull removes nothing;
  the count falls to `wanted`, and each removed instance first finishes the requests it holds.
- **Cooldowns:** after any change, the count rises again only once `up_cooldown` seconds have passed, and falls
  only once `down_cooldown` seconds have passed, so every decision rests on samples taken at the current count.

    scaler = Scaler(AutoscalePolicy(), started=now)
    scaler.sample(now, load=5)
    count = scaler.decide(now, count=1, low=1, high=4)
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

SAMPLE_INTERVAL = 1.0


@dataclass(frozen=True)
class AutoscalePolicy:
    """What the autoscaler aims for, and how long it waits between changes."""

    target: float = 0.8  # busy fraction per instance
    up_cooldown: float = 6.0
    down_cooldown: float = 60.0


class Scaler:
    """One node's load samples, and the count they call for."""

    def __init__(self, policy: AutoscalePolicy, *, started: float) -> None:
        self.policy = policy
        self.changed_at = started
        self._samples: deque[tuple[float, float]] = deque()

    def sample(self, now: float, load: float) -> None:
        """Record the requests the node holds now (running plus waiting)."""
        self._samples.append((now, load))
        horizon = now - max(self.policy.up_cooldown, self.policy.down_cooldown) - SAMPLE_INTERVAL
        while self._samples and self._samples[0][0] < horizon:
            self._samples.popleft()

    def decide(self, now: float, *, count: int, low: int, high: int) -> int:
        """The count the node should run; `count` when nothing should change yet."""
        if not self._samples:
            return count
        since_change = now - self.changed_at
        wanted = count
        if since_change >= self.policy.up_cooldown:
            up = self._wanted(now - self.policy.up_cooldown)
            if up > count:
                wanted = up
        if wanted == count and since_change >= self.policy.down_cooldown:
            down = self._wanted(now - self.policy.down_cooldown)
            if down < count:
                wanted = down
        wanted = min(max(wanted, low), high)
        if wanted != count:
            self.changed_at = now
        return wanted

    def mean_load(self, since: float) -> float:
        loads = [load for at, load in self._samples if at >= since]
        return sum(loads) / len(loads) if loads else 0.0

    def _wanted(self, since: float) -> int:
        return math.ceil(self.mean_load(since) / self.policy.target - 1e-9)
