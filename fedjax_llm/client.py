"""Client local training: one pure function, the local steps in a `lax.scan`.

`make_local_update` closes over the model's apply function and an optax client optimizer and returns
`local_update(trainable, frozen, batches, key, hparams, weight) -> ClientOutput`. It is written for one
client; the round compute vmaps it over a stacked client axis (frozen params unbatched).
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from fedjax_llm.config import ClientConfig
from fedjax_llm.types import ClientBatches, ClientHParams, ClientOutput, Params

ApplyFn = Callable[..., jax.Array]  # apply(trainable, frozen, tokens_BxT, dropout_key) -> logits
ExtraLoss = Callable[[Params, Params], jax.Array]  # (local trainable, global trainable) -> scalar


def client_optimizer(cfg: ClientConfig) -> optax.GradientTransformation:
    """The client optimizer from config; the learning rate is an injected (traced) hyperparameter."""

    def factory(learning_rate):
        parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
        if cfg.optimizer == "adamw":
            parts.append(optax.adamw(learning_rate, weight_decay=cfg.weight_decay))
        elif cfg.optimizer == "adam":
            parts.append(optax.adam(learning_rate))
        elif cfg.optimizer == "sgd":
            parts.append(optax.sgd(learning_rate, momentum=cfg.momentum or None))
            if cfg.weight_decay:
                parts.insert(0, optax.add_decayed_weights(cfg.weight_decay))
        else:
            raise ValueError(f"client.optimizer: unknown optimizer {cfg.optimizer!r}")
        return optax.chain(*parts)

    return optax.inject_hyperparams(factory)(learning_rate=cfg.lr)


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood, computed in float32."""
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]


def next_token_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                    mask_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed masked cross-entropy, number of target tokens)."""
    return jnp.sum(token_nll(logits_BxTxV, targets_BxT) * mask_BxT), jnp.sum(mask_BxT)


def make_loss_fn(apply_fn: ApplyFn) -> Callable:
    """loss(trainable, frozen, tokens_BxT, mask_BxT, dropout_key) -> (mean loss, (loss_sum, tokens))."""

    def loss_fn(trainable, frozen, tokens_BxT, mask_BxT, dropout_key):
        logits = apply_fn(trainable, frozen, tokens_BxT[:, :-1], dropout_key)
        loss_sum, ntok = next_token_loss(logits, tokens_BxT[:, 1:], mask_BxT[:, 1:])
        return loss_sum / jnp.maximum(ntok, 1.0), (loss_sum, ntok)

    return loss_fn


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_local_update(apply_fn: ApplyFn, optimizer: optax.GradientTransformation,
                      extra_loss: Optional[ExtraLoss] = None) -> Callable[..., ClientOutput]:
    """Builds the pure client update. `extra_loss` adds a term such as FedProx's proximal penalty."""
    loss_fn = make_loss_fn(apply_fn)

    def total_loss(params, global_params, frozen, tokens, mask, key):
        loss, aux = loss_fn(params, frozen, tokens, mask, key)
        if extra_loss is not None:
            loss = loss + extra_loss(params, global_params)
        return loss, aux

    grad_fn = jax.value_and_grad(total_loss, has_aux=True)

    def local_update(trainable: Params, frozen: Params, batches: ClientBatches, key: jax.Array,
                     hparams: ClientHParams, weight: jax.Array) -> ClientOutput:
        opt_state = optimizer.init(trainable)
        opt_state = opt_state._replace(
            hyperparams={**opt_state.hyperparams, "learning_rate": hparams.lr})
        step_keys = jax.random.split(key, batches.step_mask.shape[0])

        def step(carry, xs):
            params, state = carry
            tokens, mask, valid, step_key = xs
            (_, (loss_sum, ntok)), grads = grad_fn(params, trainable, frozen, tokens, mask, step_key)
            updates, new_state = optimizer.update(grads, state, params)
            new_params = optax.apply_updates(params, updates)
            keep = lambda new, old: jnp.where(valid, new, old)
            carry = (jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_state, state))
            return carry, (jnp.where(valid, loss_sum, 0.0), jnp.where(valid, ntok, 0.0))

        xs = (batches.tokens, batches.loss_mask, batches.step_mask, step_keys)
        (final, _), (loss_sums, ntoks) = jax.lax.scan(step, (trainable, opt_state), xs)
        delta = jax.tree.map(lambda a, b: a - b, final, trainable)
        loss_sum = jnp.sum(loss_sums)
        finite = _all_finite(delta) & jnp.isfinite(loss_sum)
        return ClientOutput(delta=delta, weight=jnp.asarray(weight, jnp.float32), loss_sum=loss_sum,
                            tokens=jnp.sum(ntoks), finite=finite)

    return local_update
