"""What `appliance index rebuild --from-tier NAME` hands the node's rebuild (appliance/store/rebuild.py): the named
tiers opened, and the tier model's functions (the index Copy of an archive location, a member's end, availability,
the tier of a backend, the read order). The store layer never imports tiering; the CLI calls this."""

from __future__ import annotations

import functools

from appliance.config import Config
from appliance.errors import ConfigError
from appliance.store.backend import BlobBackend, Location
from appliance.store.rebuild_tiers import TierSources
from tiering.archive import BLOCK, parse_location
from tiering.mover import copy_of
from tiering.tiers import availability_of, open_tier, tier_of_backend, tier_order


def member_end(location: Location) -> int:
    """Offset just past an archive member (its data padded to a tar block): what recovery must keep of an open
    tape archive once the index names the member."""
    _container, _record, data, stored, _size = parse_location(location)
    return data + stored + (-stored) % BLOCK


def open_sources(config: Config, names: list[str]) -> TierSources:
    """The tiers ``names`` opened for a rebuild (an unknown name, or a tier that cannot be opened, is refused:
    a node rebuilt without a tier it names would lose that tier's studies). Close with ``close_sources``."""
    backends: dict[str, BlobBackend] = {}
    try:
        for name in dict.fromkeys(names):
            tier = config.tier(name)
            if tier is None:
                known = ", ".join(t.name for t in config.tiers) or "none"
                raise ConfigError(f"no tier named {name!r} in the config (tiers: {known})")
            backends[name] = open_tier(tier)
            # An object-store prefix is marked with its owner (`tier init`): a node rebuilt from another node's
            # prefix would name objects that node's movers delete. A replaced node that takes the prefix over
            # runs `tier init NAME --adopt` first.
            check_owner = getattr(backends[name], "check_owner", None)
            if check_owner is not None:
                check_owner()
    except BaseException:
        close_sources(backends)
        raise
    return TierSources(backends, copy_of, member_end, functools.partial(availability_of, config),
                       functools.partial(tier_of_backend, config), tier_order(config))


def close_sources(backends: dict[str, BlobBackend]) -> None:
    for backend in backends.values():
        backend.close()
