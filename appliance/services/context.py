"""What the storage services of one worker process share (volumes and their segment backends, the group committer,
the spool budget, metrics). Built once per worker by the server; the network layer never sees it (it sees the
Application)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.config import Config, PeerConfig

if TYPE_CHECKING:
    from appliance.index.db import StudyIndex
    from appliance.metrics import Metrics
    from appliance.services.access import AccessRecorder
    from appliance.store.commit import GroupCommitter
    from appliance.store.online import BlobStore
    from appliance.store.spool import SpoolBudget
    from appliance.store.volumes import VolumeSet


@dataclass
class WorkerContext:
    config: Config
    volumes: VolumeSet
    committer: GroupCommitter
    metrics: Metrics
    blobstore: BlobStore
    spool_budget: SpoolBudget
    index: StudyIndex  # the worker's own environment: queries and retrieves read it (short read transactions)
    accepted_sop_classes: frozenset[str] = frozenset()
    # The TLS context of the associations we open to [peers] with tls = true (net/tls.py client_context); None
    # when no peer asks for it.
    client_tls: ssl.SSLContext | None = None
    # Last access of the studies C-MOVE and C-GET read (appliance/services/access.py); None in tests that do not record it.
    access: AccessRecorder | None = None

    def ssl_for(self, peer: PeerConfig) -> ssl.SSLContext | None:
        """What ClientAssociation.open takes for an association to ``peer``."""
        if not peer.tls:
            return None
        assert self.client_tls is not None, "config validation requires [tls] certificates for a peer with tls"
        return self.client_tls

    @classmethod
    def build(cls, config: Config, **kwargs: Any) -> WorkerContext:
        return cls(config=config, accepted_sop_classes=frozenset(config.dicom.sop_classes), **kwargs)
