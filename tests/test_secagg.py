"""Secure aggregation against the plaintext sum, with dropouts; masked vectors look uniform."""
import numpy as np
import pytest
from scipy import stats

from fedjax_llm.secure import secagg as SA


def _source(seed):
    """A seeded byte source in place of os.urandom, so statistical tests are reproducible."""
    rng = np.random.default_rng(seed)
    return lambda n: rng.bytes(n)


def _fixed_point_sum(X, params):
    """Independent reference: NumPy float64 clip, round half to even, integer sum, scale back."""
    codes = np.rint(np.clip(X.astype(np.float64), -params.clip_range, params.clip_range)
                    * 2.0**params.frac_bits).astype(np.int64)
    return codes.sum(0) * 2.0**-params.frac_bits


def _chi2_uniform_bytes(a):
    counts = np.bincount(np.asarray(a).view(np.uint8).ravel(), minlength=256)
    return stats.chisquare(counts).pvalue


def test_shamir_any_t_shares_reconstruct():
    rng = np.random.default_rng(1)
    for n, t in [(3, 2), (7, 4), (20, 11)]:
        secret = int.from_bytes(rng.bytes(32), "big")
        shares = SA.shamir_split(secret, n, t, _source(n))
        for _ in range(5):
            pick = rng.choice(n, t, replace=False)
            assert SA.shamir_combine([shares[i] for i in pick]) == secret
        assert SA.shamir_combine([shares[i] for i in range(t - 1)]) != secret


@pytest.mark.parametrize("n,t,ring", [(3, 2, 32), (5, 3, 32), (10, 6, 32), (16, 9, 32), (7, 4, 64)])
def test_sum_equals_plaintext_with_random_dropouts(n, t, ring):
    rng = np.random.default_rng(n * 100 + t)
    params = SA.SecAggParams(threshold=t, clip_range=1.0, frac_bits=16, ring_bits=ring)
    names = [f"client-{i}" for i in range(n)]
    for trial, n_drop in enumerate(sorted({0, 1, n - t, int(rng.integers(0, n - t + 1))})):
        session = SA.setup(names, params, session_id=f"run/round {trial}", randbytes=_source(trial))
        X = rng.uniform(-1.3, 1.3, (n, 257)).astype(np.float32)  # some values get clipped
        dropped = set(rng.choice(n, n_drop, replace=False).tolist())
        alive = [i for i in range(n) if i not in dropped]
        masked = {names[i]: SA.mask(session, names[i], X[i]) for i in alive}
        # Some parties that sent a masked input may miss the unmasking round, as long as t answer.
        survivors = [names[i] for i in alive][: max(t, len(alive) - 1)]
        got = SA.unmask(session, masked, survivors)
        np.testing.assert_array_equal(got, _fixed_point_sum(X[alive], params))
        plain = np.clip(X[alive].astype(np.float64), -1, 1).sum(0)
        assert np.max(np.abs(got - plain)) <= len(alive) * params.step / 2


def test_a_masked_vector_looks_uniform_and_the_plain_code_does_not():
    params = SA.SecAggParams(threshold=2, clip_range=4.0, frac_bits=16)
    session = SA.setup(["a", "b", "c"], params, randbytes=_source(7))
    x = np.linspace(-1, 1, 1 << 15, dtype=np.float32)  # highly structured input
    y = SA.mask(session, "a", x)
    assert y.dtype == np.uint32
    assert _chi2_uniform_bytes(y) > 1e-3
    top = (y >> 24).astype(np.int64)  # the most significant byte of each ring element
    assert stats.chisquare(np.bincount(top, minlength=256)).pvalue > 1e-3
    assert stats.kstest(y / 2.0**32, "uniform").pvalue > 1e-3
    assert _chi2_uniform_bytes(SA.encode(x, params)) < 1e-12  # the test has power


def test_late_party_stays_masked_by_its_self_mask():
    """A party treated as dropped has its pairwise masks revealed; its self mask still hides x."""
    params = SA.SecAggParams(threshold=3, clip_range=1.0)
    names = ["a", "b", "c", "d"]
    session = SA.setup(names, params, randbytes=_source(3))
    X = np.tile(np.linspace(-1, 1, 4096, dtype=np.float32), (4, 1))
    masked = {u: SA.mask(session, u, X[i]) for i, u in enumerate(names)}
    late = masked.pop("d")  # arrives after the server declared "d" dropped
    SA.unmask(session, masked)
    # What the server can now compute: d's pairwise key from the survivors' shares.
    shares = [(names.index(v) + 1, session._private[v].shares["d"][0]) for v in ["a", "b", "c"]]
    s_sk = SA.X25519PrivateKey.from_private_bytes(SA.shamir_combine(shares).to_bytes(32, "big"))
    stripped = late.copy()
    for v in ["a", "b", "c"]:  # d is last: it subtracted every pairwise mask
        stripped += SA.prg(SA._pair_seed(s_sk, session.s_pub[v], session, "d", v), 4096, np.uint32)
    code = SA.encode(X[3], params)
    assert not np.array_equal(stripped, code)
    assert _chi2_uniform_bytes(stripped) > 1e-3
    # Conversely a survivor's self-mask seed is revealed, but its pairwise masks still hide its input.
    shares = [(names.index(v) + 1, session._private[v].shares["a"][1]) for v in ["a", "b", "c"]]
    b_seed = SA.shamir_combine(shares).to_bytes(32, "big")
    unself = masked["a"] - SA.prg(b_seed, 4096, np.uint32)
    assert not np.array_equal(unself, SA.encode(X[0], params))
    assert _chi2_uniform_bytes(unself) > 1e-3
    with pytest.raises(SA.SecAggError, match="'d' was treated as dropped"):
        SA.unmask(session, {**masked, "d": late})  # would reveal d's self-mask seed too


def test_too_many_dropouts_and_reuse_are_errors():
    params = SA.SecAggParams(threshold=4, clip_range=1.0)
    names = [f"p{i}" for i in range(6)]
    session = SA.setup(names, params)
    x = np.zeros(8, np.float32)
    masked = {u: SA.mask(session, u, x) for u in names[:3]}  # 3 dropped > n - t = 2
    with pytest.raises(SA.SecAggError, match=r"only 3 of 6 .*threshold 4.*more than n - t = 2"):
        SA.unmask(session, masked)
    with pytest.raises(SA.SecAggError, match="already masked"):
        SA.mask(session, "p0", x)
    session = SA.setup(names, params)
    masked = {u: SA.mask(session, u, x) for u in names[:5]}
    with pytest.raises(SA.SecAggError, match="only 3 of 6"):
        SA.unmask(session, masked, survivors=names[:3])  # 5 sent, but only 3 answer


def test_configuration_errors_at_setup():
    with pytest.raises(SA.SecAggError, match=r"overflow: 100 parties x clip_range 1000.0 x 2\^16.*ring_bits=32"):
        SA.setup([f"c{i}" for i in range(100)], SA.SecAggParams(threshold=60, clip_range=1000.0))
    SA.SecAggParams(threshold=60, clip_range=1000.0, ring_bits=64).check(100)  # fits in 64 bits
    with pytest.raises(SA.SecAggError, match="threshold"):
        SA.setup(["a", "b", "c", "d"], SA.SecAggParams(threshold=2))
    with pytest.raises(SA.SecAggError, match="duplicate"):
        SA.setup(["a", "a", "b"], SA.SecAggParams(threshold=2))
