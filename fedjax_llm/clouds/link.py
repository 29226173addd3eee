"""Simulated network links between a cloud and the global aggregator."""
from __future__ import annotations

import dataclasses

from fedjax_llm.config import LinkConfig


@dataclasses.dataclass(frozen=True)
class Link:
    """A one-hop link: fixed latency plus serialization delay at the given bandwidth."""

    bandwidth_mbps: float
    latency_ms: float

    @classmethod
    def from_config(cls, cfg: LinkConfig) -> "Link":
        return cls(bandwidth_mbps=cfg.bandwidth_mbps, latency_ms=cfg.latency_ms)

    def transfer_seconds(self, nbytes: int) -> float:
        """Seconds to deliver one message of `nbytes` over this link."""
        return self.latency_ms / 1e3 + nbytes * 8.0 / (self.bandwidth_mbps * 1e6)
