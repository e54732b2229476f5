"""What the storage services of one worker process share (volumes, group committer, tmp-file reserves,
metrics). Built once per worker by the server; the network layer never sees it (it sees the Application)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from appliance.config import Config

if TYPE_CHECKING:
    from appliance.metrics import Metrics
    from appliance.store.blobs import TmpFileReserve
    from appliance.store.commit import GroupCommitter
    from appliance.store.volumes import VolumeSet


@dataclass
class WorkerContext:
    config: Config
    volumes: VolumeSet
    committer: GroupCommitter
    metrics: Metrics
    accepted_sop_classes: frozenset[str] = frozenset()
    tmp_reserves: dict[str, TmpFileReserve] = field(default_factory=dict)  # volume name -> pre-created tmp files

    @classmethod
    def build(cls, config: Config, **kwargs: Any) -> WorkerContext:
        return cls(config=config, accepted_sop_classes=frozenset(config.dicom.sop_classes), **kwargs)
