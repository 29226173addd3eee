"""The jitted compute of one round: every sampled client trains, each cloud reduces its clients.

Clients sit on a padded leading axis laid out as [devices, chunks, clients_per_chunk]. `shard_map`
gives each device its slice of clients; each device runs a `lax.scan` over its chunks, vmaps the client
update inside a chunk and folds the outputs into per-cloud accumulators, so memory is bounded by one
chunk of client states whatever the cohort size. Accumulators are then summed across devices.
The frozen (LoRA base) params are one shared, unbatched argument. A loop backend runs the same pieces
client by client in Python for debugging and as the test reference.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fedjax_llm.aggregate.base import Reducer
from fedjax_llm.types import ClientBatches, ClientHParams, ClientOutput, CloudAggregate, Params

AXIS = "clients"


@dataclasses.dataclass(frozen=True)
class RoundLayout:
    """How K clients are padded and laid out: [devices, chunks, chunk]."""

    num_clients: int
    num_devices: int
    num_chunks: int
    chunk: int

    @property
    def padded(self) -> int:
        return self.num_devices * self.num_chunks * self.chunk

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_devices, self.num_chunks, self.chunk)


def default_chunk(platform: str) -> int:
    """Clients vmapped together per scan step when the config says auto (0).

    On CPU one client per step keeps activations in cache (measured faster than wide vmaps, see
    experiments/bench_round.py); accelerators want every client of the device in one step.
    """
    return 1 if platform == "cpu" else 0


def plan_layout(num_clients: int, num_devices: int, clients_per_chunk: int) -> RoundLayout:
    """Pads K to devices x chunks x chunk; clients_per_chunk 0 means all of a device's clients."""
    per_device = max(1, math.ceil(num_clients / num_devices))
    chunk = per_device if clients_per_chunk <= 0 else min(clients_per_chunk, per_device)
    return RoundLayout(num_clients, num_devices, math.ceil(per_device / chunk), chunk)


@struct.dataclass
class RoundInputs:
    """Host-prepared, padded per-client inputs of a round, leading axis = padded K."""

    batches: ClientBatches   # inputs leaves [Kp, S, B, ...]; step_mask [Kp, S]
    keys: Any                # [Kp, 2] uint32 raw PRNG key data
    weights: Any             # [Kp] float32, 0 for padding, dropped and absent clients
    onehot: Any              # [Kp, C] float32 cloud membership
    attacked: Any            # [Kp] bool, Byzantine clients
    state: Any               # the algorithm's per-client state for these clients, leaves [Kp, ...]


@struct.dataclass
class RoundResult:
    clouds: CloudAggregate   # leading axis C
    loss_sum: jax.Array      # [Kp] per client
    tokens: jax.Array        # [Kp]
    finite: jax.Array        # [Kp] bool
    state: Any               # new per-client state, leaves [Kp, ...]
    deltas: Any = ()         # with collect=True: (per-client deltas [Kp, ...], sanitized weights [Kp])


def sanitize(out: ClientOutput) -> ClientOutput:
    """Zeroes the weight and update of non-finite clients so NaN cannot reach any sum."""
    ok = out.finite & (out.weight > 0)
    keep = lambda x: jnp.where(ok.reshape(ok.shape + (1,) * (x.ndim - ok.ndim)), x, 0)
    return out.replace(delta=jax.tree.map(keep, out.delta), aux=jax.tree.map(keep, out.aux),
                       weight=jnp.where(ok, out.weight, 0.0), loss_sum=jnp.where(ok, out.loss_sum, 0.0),
                       tokens=jnp.where(ok, out.tokens, 0.0), steps=jnp.where(ok, out.steps, 0.0))


def _to_layout(x: Any, layout: RoundLayout) -> Any:
    return jax.tree.map(lambda a: a.reshape(layout.shape + a.shape[1:]), x)


def _first(tree: Any) -> Any:
    return jax.tree.map(lambda a: a[0], tree)


def client_template(local_update, trainable, frozen, inputs, hparams, broadcast) -> ClientOutput:
    """Shapes of one client's output, for sizing the reducer's accumulators."""
    args = (trainable, frozen, _first(inputs.batches), jax.random.key(0), hparams,
            jnp.float32(1), _first(inputs.state), broadcast)
    return jax.eval_shape(local_update, *args)[0]


def make_round_compute(local_update: Callable, reducer: Reducer, transform: Callable, num_clouds: int,
                       mesh: Mesh, layout: RoundLayout, collect: bool = False) -> Callable[..., RoundResult]:
    """Returns jit(trainable, frozen, broadcast, inputs: RoundInputs, hparams) -> RoundResult.

    `collect` also returns every client's (sanitized) update, for protocols that must see them one by
    one on the host (secure aggregation inside a cloud); it costs one update per client of memory.
    """
    client_axes = (None, None, 0, 0, None, 0, 0, None)
    if layout.chunk == 1:
        # A size-1 vmap turns every matmul into a batched dot, which XLA:CPU runs slower than the
        # plain one; call the client directly and restore the chunk axis instead.
        def vmapped(trainable, frozen, b, k, hp, w, st, bc):
            out = local_update(trainable, frozen, _first(b), _first(k), hp, w[0], _first(st), bc)
            return jax.tree.map(lambda a: a[None], out)
    else:
        vmapped = jax.vmap(local_update, in_axes=client_axes)

    def per_device(trainable, frozen, broadcast, inputs: RoundInputs, hparams):
        # Local shapes: [1, chunks, chunk, ...]; scan over chunks, vmap inside a chunk.
        local = jax.tree.map(lambda a: a[0], inputs)
        flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), local)
        template = client_template(local_update, trainable, frozen, flat, hparams, broadcast)
        acc0 = reducer.init(template, num_clouds, layout.num_chunks * layout.chunk)

        def chunk_step(acc, x: RoundInputs):
            keys = jax.random.wrap_key_data(x.keys)
            out, state = vmapped(trainable, frozen, x.batches, keys, hparams, x.weights, x.state, broadcast)
            out = sanitize(jax.vmap(transform)(out, keys, x.attacked))
            kept = (out.delta, out.weight) if collect else ()
            return reducer.accumulate(acc, out, x.onehot), (out.loss_sum, out.tokens, out.finite, state, kept)

        acc, per_client = jax.lax.scan(chunk_step, acc0, local)
        acc = reducer.combine(acc, AXIS)
        return (acc,) + jax.tree.map(lambda a: a[None], per_client)

    sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(), P(AXIS), P()),
                            out_specs=(P(), P(AXIS), P(AXIS), P(AXIS), P(AXIS), P(AXIS)), check_vma=False)

    @jax.jit
    def compute(trainable: Params, frozen: Params, broadcast: Any, inputs: RoundInputs,
                hparams: ClientHParams) -> RoundResult:
        acc, loss_sum, tokens, finite, state, kept = sharded(trainable, frozen, broadcast,
                                                             _to_layout(inputs, layout), hparams)
        flat = lambda a: a.reshape((-1,) + a.shape[3:])
        return RoundResult(clouds=reducer.finalize(acc), loss_sum=flat(loss_sum), tokens=flat(tokens),
                           finite=flat(finite), state=jax.tree.map(flat, state),
                           deltas=jax.tree.map(flat, kept))

    return compute


def input_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of the padded client axis across the mesh."""
    return NamedSharding(mesh, P(AXIS))


class ClientStageError(RuntimeError):
    """A failure inside one client's work, naming the round, cloud, client and stage."""


def make_loop_compute(local_update: Callable, reducer: Reducer, transform: Callable, num_clouds: int,
                      describe: Callable[[int], str] = lambda i: f"slot {i}",
                      collect: bool = False) -> Callable[..., RoundResult]:
    """Client-by-client reference: jitted single-client update, host loop, same reducer. A failure
    names the round and the slot as `describe` (given here or per call) puts it."""
    update = jax.jit(local_update)
    finish = jax.jit(lambda out, key, attacked: sanitize(transform(out, key, attacked)))
    accumulate = jax.jit(reducer.accumulate)
    add_axis = lambda t: jax.tree.map(lambda a: jnp.asarray(a)[None], t)

    def compute(trainable, frozen, broadcast, inputs: RoundInputs, hparams, round_index: int = -1,
                describe_slot: Callable[[int], str] = describe):
        n = inputs.weights.shape[0]
        template = client_template(local_update, trainable, frozen, inputs, hparams, broadcast)
        acc = reducer.init(template, num_clouds, n)
        outs, states = [], []
        for i in range(n):
            stage = "local_update"
            try:
                x = jax.tree.map(lambda a: a[i], inputs)
                key = jax.random.wrap_key_data(jnp.asarray(x.keys))
                # Blocking here attributes asynchronous device errors to this client.
                out, state = jax.block_until_ready(
                    update(trainable, frozen, x.batches, key, hparams, x.weights, x.state, broadcast))
                stage = "reduce"
                out = finish(out, key, x.attacked)
                acc = accumulate(acc, add_axis(out), jnp.asarray(x.onehot)[None])
            except Exception as e:  # re-raised with the place it happened
                raise ClientStageError(f"round {round_index}, {describe_slot(i)}: stage {stage} failed: "
                                       f"{type(e).__name__}: {e}") from e
            outs.append(out)
            states.append(state)
        stack = lambda *a: jnp.stack(a)
        kept = ((jax.tree.map(stack, *[o.delta for o in outs]), jnp.stack([o.weight for o in outs]))
                if collect else ())
        return RoundResult(clouds=reducer.finalize(acc), loss_sum=jnp.stack([o.loss_sum for o in outs]),
                           tokens=jnp.stack([o.tokens for o in outs]),
                           finite=jnp.stack([o.finite for o in outs]), state=jax.tree.map(stack, *states),
                           deltas=kept)

    return compute
