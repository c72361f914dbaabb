"""Prefetch admission: which off-device object to bring up next, if any.

The candidate is the off-device object whose owners call soonest. It is admitted while its call
lies within `horizon_steps`, or sooner than its load time plus `margin_s`; while the bytes
prefetched and not yet used stay under `max_prefetched_device_fraction` of the device (so that
speculation never crowds out the requests running or waiting now); and while nothing prefetched
for its step or an earlier one was pushed out unused in this step: such a waste shows that the
device cannot hold state that far ahead now, so the lookahead shrinks to the nearer steps until
the simulation moves on (no ping-pong). Room for it may only be made from objects whose owners
call in a strictly later step (hysteresis).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

from scalesim.memory.index import ObjectIndex
from scalesim.memory.resident import ResidentObject, TierBandwidth

DEFAULT_PREFETCH_HORIZON_STEPS = 1
DEFAULT_PREFETCH_MARGIN_S = 0.05
DEFAULT_MAX_BYTES_IN_FLIGHT = 256 * 2**20
DEFAULT_MAX_PREFETCHED_DEVICE_FRACTION = 0.5
CANDIDATES_SCANNED = 8  # entries passed over when the nearest ones are already moving


@dataclass
class PrefetchSettings:
    horizon_steps: float = DEFAULT_PREFETCH_HORIZON_STEPS
    margin_s: float = DEFAULT_PREFETCH_MARGIN_S
    max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT
    max_prefetched_device_fraction: float = DEFAULT_MAX_PREFETCHED_DEVICE_FRACTION


class Prefetcher:
    def __init__(self, index: ObjectIndex, bandwidth: TierBandwidth, settings: PrefetchSettings) -> None:
        self.index = index
        self.bandwidth = bandwidth
        self.settings = settings
        self.prefetched_nbytes = 0  # on the device by prefetch and not used yet
        self._lookahead_limit = math.inf  # expected steps at or past this are not prefetched in this step
        self._unused: dict[str, tuple[ResidentObject, float]] = {}  # prefetched, not used yet -> step it was for

    def mark(self, obj: ResidentObject, for_step: float) -> None:
        obj.prefetched_nbytes = obj.nbytes
        self.prefetched_nbytes += obj.nbytes
        self._unused[obj.key] = (obj, for_step)

    def unmark(self, obj: ResidentObject) -> None:
        self.prefetched_nbytes -= obj.prefetched_nbytes  # its size may have changed since (a split)
        obj.prefetched_nbytes = 0
        self._unused.pop(obj.key, None)

    def expired(self, now_step: float) -> list[ResidentObject]:
        """Prefetches for steps now past that no request used (all of them with `now_step` inf):
        they stop counting against the cap (they are wasted; the objects stay where they are,
        evictable by their keys)."""
        gone = [obj for obj, for_step in self._unused.values() if for_step < now_step]
        for obj in gone:
            self.unmark(obj)
        return gone

    def wasted(self, obj: ResidentObject) -> None:
        """A prefetched object was pushed out before any request used it: stop prefetching that
        far ahead for the rest of this step."""
        for_step = self._unused.get(obj.key, (None, math.inf))[1]
        self._lookahead_limit = min(self._lookahead_limit, for_step)
        self.unmark(obj)

    def new_step(self) -> None:
        self._lookahead_limit = math.inf

    def run(self, device_nbytes: int, promote: Callable[[ResidentObject, tuple], bool]) -> int:
        """Prefetch candidates while admitted, within the bytes-in-flight bound; return the bytes
        moved. `promote(obj, above)` loads one, displacing only objects with keys above `above`."""
        moved = 0
        while moved < self.settings.max_bytes_in_flight:
            found = self.candidate(device_nbytes)
            if found is None or not promote(*found):
                return moved
            moved += found[0].nbytes
        return moved

    def candidate(self, device_nbytes: int) -> tuple[ResidentObject, tuple] | None:
        """The next object to prefetch and the key prefix it may displace objects above, or None."""
        tracker, settings = self.index.tracker, self.settings
        passed_over = []
        try:
            for _ in range(CANDIDATES_SCANNED):
                found = self.index.top_wanted()
                if found is None:
                    return None
                obj, key = found
                expected = key[0]
                distance_steps = expected - tracker.now_step()
                if not math.isfinite(distance_steps) or (
                        distance_steps > settings.horizon_steps
                        and distance_steps * tracker.seconds_per_step > obj.reload_seconds(self.bandwidth) + settings.margin_s):
                    return None
                if expected >= self._lookahead_limit:
                    return None
                if self.prefetched_nbytes + obj.nbytes > settings.max_prefetched_device_fraction * device_nbytes:
                    return None
                if obj.moving_to is not None or obj.load_error is not None:
                    self.index.take(obj)
                    passed_over.append(obj)
                    continue
                return obj, self.index.room_above(expected)
            return None
        finally:
            for obj in passed_over:
                self.index.rekey(obj)
