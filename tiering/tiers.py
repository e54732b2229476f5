"""Which backend class serves each tier kind, and the tier of a copy.

``open_tier`` is the one place a TierConfig becomes a BlobBackend (the movers, recall, `verify`, `tier status`
and BlobStore all go through it), so a new kind (S3) plugs in here and nowhere else."""

from __future__ import annotations

import importlib
from typing import Any

from appliance.config import Config
from appliance.config_tiering import KIND_RANK, ONLINE_TIER, TierConfig
from appliance.index.schema import NEARLINE, OFFLINE, ONLINE
from appliance.store.backend import BlobBackend

# kind -> "module:factory"; the factory takes the TierConfig and returns the backend (imported lazily: a node
# without tape never imports the tape code).
KINDS = {
    "nearline": "tiering.nearline:open_nearline",
    "s3": "tiering.s3:open_s3",
    "tape": "tiering.tape.backend:open_tape",
}
# An S3 copy is NEARLINE: it is read in milliseconds to seconds, without a recall (PS3.4 C.6.1.1.5.1).
AVAILABILITY_OF_KIND = {"nearline": NEARLINE, "s3": NEARLINE, "tape": OFFLINE}


def _factory(kind: str, name: str) -> Any:
    module, func = KINDS[kind].split(":")
    return getattr(importlib.import_module(module), func)


def open_tier(tier: TierConfig) -> BlobBackend:
    backend: BlobBackend = _factory(tier.kind, tier.name)(tier)
    return backend


def init_tier(tier: TierConfig, adopt: bool = False) -> str:
    """Prepare a tier's media (markers on nearline volumes, cartridges of a virtual library, an s3 prefix's
    marker); returns what was done, for the CLI to print. Refuses media that already belong to another tier, and
    an s3 prefix of another appliance unless ``adopt`` (nearline and tape ignore it)."""
    module, _func = KINDS[tier.kind].split(":")
    init = importlib.import_module(module).init_tier
    result: str = init(tier, adopt=adopt) if tier.kind == "s3" else init(tier)
    return result


def tier_of_backend(config: Config, backend: str) -> str:
    """The tier a copy's backend belongs to: "online" for a volume name, else the tier's name."""
    if any(v.name == backend for v in config.volumes):
        return ONLINE_TIER
    return backend


def availability_of(config: Config, backends: list[str]) -> str:
    """Instance Availability of an instance whose copies lie on ``backends``: the best of them."""
    best = OFFLINE
    for backend in backends:
        if tier_of_backend(config, backend) == ONLINE_TIER:
            return ONLINE
        tier = config.tier(backend)
        if tier is not None and AVAILABILITY_OF_KIND[tier.kind] == NEARLINE:
            best = NEARLINE
    return best


def tier_order(config: Config) -> list[str]:
    """Tiers from fastest to slowest: online, nearline tiers, s3 tiers, tape tiers (the order copies are read in)."""
    return [ONLINE_TIER, *[t.name for t in sorted(config.tiers, key=lambda t: KIND_RANK[t.kind])]]
