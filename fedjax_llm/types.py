"""Pytree dataclasses shared by the client, the round compute and the server."""
from __future__ import annotations

from typing import Any

import jax
from flax import struct

Params = Any  # nested dict of arrays (see fedjax_llm.models.params)


@struct.dataclass
class ClientBatches:
    """One client's (or, with leading axes, many clients') local data for a round.

    `inputs` is the task's pytree with leaves [S, B, ...]; for language modelling it is
    {"tokens": [S, B, T] int32, "loss_mask": [S, B, T] float32}.
    """

    inputs: Any
    step_mask: jax.Array   # [S] bool, False = the step is padding and must not move the model


@struct.dataclass
class ClientHParams:
    """Client hyperparameters passed as traced values, so changing them never recompiles."""

    lr: jax.Array          # scalar float32


@struct.dataclass
class ClientOutput:
    """What one client's local training returns."""

    delta: Params          # local params - global params (trainable part), after the algorithm's finish
    weight: jax.Array      # scalar float32 aggregation weight (examples, or 1 for uniform); 0 = absent
    steps: jax.Array       # optimizer steps actually taken (FedNova's tau)
    aux: Any               # extra per-client outputs of the algorithm (SCAFFOLD's control delta); ()
    loss_sum: jax.Array    # summed token loss over the local steps
    tokens: jax.Array      # target tokens trained on
    finite: jax.Array      # bool: the update and loss are all finite


@struct.dataclass
class CloudAggregate:
    """A cloud's reduction of its clients: the message it sends to the global aggregator."""

    delta: Params          # the cloud's rule over its clients' deltas (weighted mean by default)
    weight: jax.Array      # sum of its clients' weights
    steps: jax.Array       # weight-averaged local steps
    aux: Any               # uniform mean over its present clients of their aux outputs
    loss_sum: jax.Array
    tokens: jax.Array
    clients: jax.Array     # clients that contributed (finite, weight > 0)
