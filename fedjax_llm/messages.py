"""What crosses between the two halves of a round: typed pytrees with fixed shapes.

    aggregator --GlobalMsg--> every cloud          the global model, what the algorithm broadcasts, and
                                                   which clouds' updates of earlier rounds counted
    cloud --CloudUpdate--> aggregator              its clients' aggregate in the clear
    cloud --MaskedUpdate--> aggregator             or, with secure aggregation across clouds, its sum
                                                   masked (secure/protocol.py adds the key exchange)

Every message names the round it belongs to, so a half refuses a replayed or stale message even on a
channel that does not seal. Shapes depend only on the config (the cloud's cohort slots, the model), so
a receiver can decode any message against a template it built itself.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import struct

from fedjax_llm.clouds.message import MessageError
from fedjax_llm.types import CloudAggregate, Params

ERROR_BYTES = 240  # a cloud's reason for a void update, UTF-8, zero padded


class ProtocolError(MessageError):
    """A message for the wrong round, a replay, or one from a party outside the round."""


@struct.dataclass
class GlobalMsg:
    """Aggregator -> every cloud: opens round `round` (the same bytes for every recipient)."""

    round: jax.Array      # int32: the round this message opens
    params: Params        # global trainable params
    broadcast: Any        # what clients receive besides the params (SCAFFOLD's c, the DP clip, ...)
    counted: jax.Array    # int32[C]: per cloud, the last round whose update counted (0: none yet)


@struct.dataclass
class CloudReport:
    """A cloud's public account of its round, one entry per cohort slot (its capacity m)."""

    round: jax.Array        # int32: the round this report answers
    slot_client: jax.Array  # int32[m]: the cloud-local index of each slot's client, -1 = empty slot
    dropped: jax.Array      # bool[m]: trained, but its update never arrived
    straggler: jax.Array    # bool[m]: made fewer local steps
    nonfinite: jax.Array    # bool[m]: NaN/Inf loss or update, left out of the aggregate
    attacked: jax.Array     # bool[m]: a simulated Byzantine client
    error: jax.Array        # uint8[ERROR_BYTES]: why this cloud's update is void ('' when it is not)


@struct.dataclass
class CloudUpdate:
    """Cloud -> aggregator without secure aggregation across clouds."""

    report: CloudReport
    aggregate: CloudAggregate   # the cloud's rule over its clients; scalar weight, no cloud axis


@struct.dataclass
class MaskedUpdate:
    """Cloud -> aggregator with secure aggregation across clouds: only the sum over clouds of
    [weight x delta (+ DP noise share), weight, clients x aux] / scale can be unmasked."""

    report: CloudReport
    masked: jax.Array       # uint32 or uint64 [D]: ring elements
    loss_sum: jax.Array     # public figures, as in the clear
    tokens: jax.Array
    clients: jax.Array
    steps: jax.Array


def error_bytes(text: str) -> np.ndarray:
    raw = text.encode("utf-8")[:ERROR_BYTES]
    return np.frombuffer(raw.ljust(ERROR_BYTES, b"\0"), np.uint8).copy()


def error_text(report: CloudReport) -> str:
    return bytes(np.asarray(report.error, np.uint8)).rstrip(b"\0").decode("utf-8", "replace")


def check_round(got, expected: int, last: int, where: str) -> None:
    """Raises ProtocolError unless a message's round is `expected` and newer than `last` accepted."""
    got = int(np.asarray(got))
    if got != expected:
        raise ProtocolError(f"{where}: message for round {got}, expected round {expected}")
    if got <= last:
        raise ProtocolError(f"{where}: message for round {got} replayed (round {last} already accepted)")
