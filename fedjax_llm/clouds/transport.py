"""The in-process transport: how a message of one half of a round reaches the other in a simulation.

A hop serializes (and, with the sealed channel, seals) a tree on the sender's side and opens it on
the recipient's, as a deployment does across the wire; a message that does not open is refused and the
reason kept for the round's metrics. Per cloud it counts bytes each way, the link model's transfer
seconds and the measured seal and open seconds. The services' gRPC transport will do the same send
and receive in two processes.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Mapping, Optional

from fedjax_llm.clouds.channel import Channel
from fedjax_llm.clouds.link import Link
from fedjax_llm.clouds.message import MessageError

log = logging.getLogger(__name__)
AGGREGATOR = "aggregator"


def new_stats() -> dict:
    """One cloud's figures for a round (the keys metrics.jsonl carries under clouds.<name>)."""
    return dict(bytes_down=0, bytes_up=0, comm_s=0.0, seal_s=0.0, open_s=0.0, error=None)


def refuse(stats: dict, reason: str) -> None:
    """Keeps the first reason a cloud's part in the round failed."""
    stats["error"] = stats["error"] or reason


class InProcessTransport:
    """Hops between the aggregator and the clouds through one `Channel`, links from the config."""

    def __init__(self, channel: Channel, links: Mapping[str, Link]):
        self.channel, self.links = channel, dict(links)

    def hop(self, tree: Any, *, sender: str, recipient: str, round: int, stats: Mapping[str, dict],
            like: Any = None) -> Optional[Any]:
        """The tree as the recipient opened it, or None when it was refused (the reason goes to the
        cloud's stats). `like` is the structure the recipient expects (default: the sent tree's)."""
        cloud = recipient if sender == AGGREGATOR else sender
        st = stats[cloud]
        t0 = time.perf_counter()
        data = self.channel.send(tree, sender=sender, recipient=recipient, round=round)
        t1 = time.perf_counter()
        st["bytes_down" if sender == AGGREGATOR else "bytes_up"] += len(data)
        st["comm_s"] += self.links[cloud].transfer_seconds(len(data))
        st["seal_s"] += t1 - t0
        try:
            out, _ = self.channel.receive(data, like=tree if like is None else like, sender=sender,
                                          recipient=recipient, round=round)
            return out
        except MessageError as e:
            log.warning("round %d: message %s -> %s rejected: %s", round, sender, recipient, e)
            refuse(st, f"{sender}->{recipient}: {type(e).__name__}: {e}")
            return None
        finally:
            st["open_s"] += time.perf_counter() - t1
