"""FedProx (Li et al., MLSys 2020): a proximal term mu/2 ||w - w_global||^2 in the client loss."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_llm.client import ClientPiece


def prox_piece(mu: float) -> ClientPiece:
    """The client loss term; the server side is plain FedAvg."""

    def loss(params, global_params, broadcast):
        del broadcast
        sq = jax.tree.map(lambda p, g: jnp.sum(jnp.square((p - g).astype(jnp.float32))), params, global_params)
        return 0.5 * mu * sum(jax.tree.leaves(sq))

    return ClientPiece(name="prox", loss=loss)
