"""Pytree dataclasses shared by the client, the round compute and the server."""
from __future__ import annotations

from typing import Any

import jax
from flax import struct

Params = Any  # nested dict of arrays (see fedjax_llm.models.params)


@struct.dataclass
class ClientBatches:
    """One client's (or, with leading axes, many clients') local data for a round."""

    tokens: jax.Array      # [S, B, T] int32
    loss_mask: jax.Array   # [S, B, T] float32, 1 on target tokens
    step_mask: jax.Array   # [S] bool, False = the step is padding and must not move the model


@struct.dataclass
class ClientHParams:
    """Client hyperparameters passed as traced values, so changing them never recompiles."""

    lr: jax.Array          # scalar float32


@struct.dataclass
class ClientOutput:
    """What one client's local training returns."""

    delta: Params          # local params - global params (trainable part only)
    weight: jax.Array      # scalar float32 aggregation weight (examples, or 1 for uniform)
    loss_sum: jax.Array    # summed token loss over the local steps
    tokens: jax.Array      # target tokens trained on
    finite: jax.Array      # bool: the update and loss are all finite


@struct.dataclass
class CloudAggregate:
    """A cloud's reduction of its clients: the message it sends to the global aggregator."""

    delta: Params          # weighted mean of its clients' deltas
    weight: jax.Array      # sum of its clients' weights
    loss_sum: jax.Array
    tokens: jax.Array
    clients: jax.Array     # clients that contributed (finite, weight > 0)
