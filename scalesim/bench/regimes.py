"""Memory regimes of `scalesim bench --regime R`: how much of all agent state each tier holds.

Every regime gives the device a quarter of all agent state (at the scale ScaleSim exists for,
the accelerator holds a small share of it); they differ below the device. A baseline policy that
copies a system's default deployment keeps its own tiers whatever the regime (see
`Policy.host_per_device` and `Policy.disk` in memory/policies.py): `sglang` never has a host or
disk tier, `sglang-hicache` has its own 2x-device host tier.
"""

from dataclasses import dataclass

from scalesim.memory.policies import Policy


@dataclass(frozen=True)
class Regime:
    name: str
    device_fraction: float
    host_fraction: float
    disk: bool
    about: str


REGIMES = {r.name: r for r in (
    Regime("hbm-only", 0.25, 0.0, False,
           "device only, what SGLang and vLLM users run by default: what is evicted is recomputed"),
    Regime("hicache", 0.25, 0.5, False,
           "a host tier of 2x the device (SGLang's default --hicache-ratio), no disk: beyond it, recompute"),
    Regime("tiered", 0.25, 0.25, True,
           "host 25%, the rest on disk (reads bypass the page cache): reload from disk or recompute"),
    Regime("roomy", 0.25, 1.0, False, "the host holds everything: every miss is a host-to-device copy"),
)}
DEFAULT_REGIME = "tiered"


def resolve_regime(name: str, device_fraction: float | None = None, host_fraction: float | None = None,
                   disk: bool | None = None) -> Regime:
    """The named regime with any of its numbers overridden; ValueError on a bad name or fraction."""
    if name not in REGIMES:
        raise ValueError(f"unknown regime {name!r} (--regime); choose from {', '.join(REGIMES)}")
    base = REGIMES[name]
    device = base.device_fraction if device_fraction is None else device_fraction
    host = base.host_fraction if host_fraction is None else host_fraction
    if not 0 < device <= 1:
        raise ValueError(f"the device fraction (--device-fraction) must be in (0, 1], got {device}")
    if not 0 <= host <= 1:
        raise ValueError(f"the host fraction (--host-fraction) must be in [0, 1], got {host}")
    disk = base.disk if disk is None else disk
    if (device, host, disk) == (base.device_fraction, base.host_fraction, base.disk):
        return base
    return Regime(base.name + "*", device, host, disk, base.about + " (overridden)")


def below_device(policy: Policy, device_nbytes: int, regime_host_nbytes: int, regime_disk: bool) -> tuple[int, bool]:
    """The host budget and disk tier `policy` runs with under a device of `device_nbytes`: the
    regime's, except where the policy copies a deployment with tiers of its own (a baseline's
    host as a multiple of the device, no disk), and none for the unbounded limit."""
    if policy.unbounded_device:
        return 0, False
    host = regime_host_nbytes if policy.host_per_device is None else int(policy.host_per_device * device_nbytes)
    return host, regime_disk if policy.disk is None else policy.disk
