"""The client update against a hand-written loop of optax steps: masked steps change nothing, and a
single unbatched client skips their compute (lax.cond) while a vmapped chunk selects, with equal results."""
import pytest
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_llm.client import make_local_update
from fedjax_llm.types import ClientBatches, ClientHParams

S, B, D = 3, 4, 5


def _loss(params, frozen, inputs, key):
    del frozen, key
    err = inputs["x"] @ params["w"] - inputs["y"]
    return jnp.mean(err ** 2), (jnp.sum(err ** 2), jnp.float32(err.shape[0]))


def _batches(seed: int, step_mask) -> ClientBatches:
    rng = np.random.default_rng(seed)
    inputs = {"x": rng.normal(size=(S, B, D)).astype(np.float32), "y": rng.normal(size=(S, B)).astype(np.float32)}
    return ClientBatches(inputs=inputs, step_mask=np.asarray(step_mask, bool))


def _reference(params, batches: ClientBatches, opt):
    """Only the unmasked steps, one optax update each, in a Python loop."""
    state = opt.init(params)
    for s in range(S):
        if batches.step_mask[s]:
            grads = jax.grad(lambda p: _loss(p, None, jax.tree.map(lambda a: a[s], batches.inputs), None)[0])(params)
            updates, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, updates)
    return params


def test_masked_steps_change_nothing_and_match_a_loop_of_the_unmasked_steps():
    opt = optax.adamw(0.1)
    update = make_local_update(_loss, optax.inject_hyperparams(optax.adamw)(learning_rate=0.1))
    params = {"w": jnp.arange(D, dtype=jnp.float32) / D}
    hp = ClientHParams(lr=jnp.float32(0.1))
    masks = ([True, False, True], [False, False, False], [True, True, True])
    outs = []
    for i, mask in enumerate(masks):
        b = _batches(i, mask)
        out, _ = jax.jit(update)(params, {}, b, jax.random.key(0), hp, jnp.float32(1), {}, {})
        want = _reference(params, b, opt)
        np.testing.assert_allclose(out.delta["w"], want["w"] - params["w"], rtol=1e-5, atol=1e-6)
        assert float(out.steps) == sum(mask)
        assert float(out.tokens) == B * sum(mask)
        outs.append(out)
    assert not np.any(np.asarray(outs[1].delta["w"]))  # every step masked: the client does not move

    # The same clients stacked and vmapped (the predicate is batched, so cond becomes a select).
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *[_batches(i, m) for i, m in enumerate(masks)])
    vmapped = jax.jit(jax.vmap(update, in_axes=(None, None, 0, 0, None, None, None, None)))
    vout, _ = vmapped(params, {}, stacked, jax.random.split(jax.random.key(0), 3), hp, jnp.float32(1), {}, {})
    for i, out in enumerate(outs):
        np.testing.assert_allclose(vout.delta["w"][i], out.delta["w"], rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 63, 512), (4, 31, 8192)])
def test_token_nll_and_its_gradient_are_bitwise_those_of_log_softmax(shape):
    """The custom backward of client.token_nll against autodiff of jax.nn.log_softmax + take_along_axis
    (what it replaced): loss and gradient bit for bit, jitted and eager, with a token mask."""
    from fedjax_llm.client import token_nll

    def reference(x, t):
        return -jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), t[..., None], axis=-1)[..., 0]

    k1, k2, k3 = jax.random.split(jax.random.key(shape[-1]), 3)
    x = 3.0 * jax.random.normal(k1, shape)
    t = jax.random.randint(k2, shape[:2], 0, shape[-1])
    m = jax.random.bernoulli(k3, 0.7, shape[:2]).astype(jnp.float32)
    for wrap in (jax.jit, lambda f: f):
        for nll in (reference, token_nll):
            loss = wrap(lambda v, nll=nll: jnp.sum(nll(v, t) * m) / jnp.sum(m))
            grad = wrap(jax.grad(lambda v, nll=nll: jnp.sum(nll(v, t) * m) / jnp.sum(m)))
            if nll is reference:
                want = (np.asarray(loss(x)), np.asarray(grad(x)))
            else:
                got = (np.asarray(loss(x)), np.asarray(grad(x)))
        assert got[0].tobytes() == want[0].tobytes() and got[1].tobytes() == want[1].tobytes()
        assert np.abs(want[1]).max() > 0  # a real gradient, not two zero arrays
