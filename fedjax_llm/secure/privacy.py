"""The run's privacy ledger: a dp-accounting accountant stepped once per round, its epsilon logged,
checkpointed (as JSON in the checkpoint's metadata) and checked against a target before each round.

What is logged names the sampling honestly: `sampling_q` is the per-round inclusion probability of a
client, `sample_size` the fixed number of clients drawn (None under Poisson sampling, where it is
random) and `population` the clients it is drawn from (under per-cloud fixed-size sampling, the cloud
with the highest q, `accounted_cloud`, which bounds every client)."""
from __future__ import annotations

from typing import Optional

from fedjax_llm import participation
from fedjax_llm.config import TrainConfig
from fedjax_llm.secure import accountant as acct


class Privacy:
    def __init__(self, cfg: TrainConfig, data):
        self.dp = cfg.secure.dp
        if cfg.participation.sampling == "poisson":
            q = float(cfg.participation.fraction)
            self.rate, population, sampling = q, None, "poisson"
            # Each client is drawn independently with probability q: the sample size is random.
            self.sampling = dict(sampling="poisson", sampling_q=q, sample_size=None,
                                 population=int(len(data.client_cloud)))
        else:
            # Fixed-size sampling runs per cloud (a stratum): account the stratum with the highest rate,
            # a bound for every client.
            sizes = [int((data.client_cloud == c).sum()) for c in range(len(data.cloud_names))]
            caps = participation.per_cloud_capacity(cfg, sizes)
            worst = max(range(len(sizes)), key=lambda c: caps[c] / sizes[c])
            self.rate, population, sampling = caps[worst], sizes[worst], "fixed"  # the accountant takes m
            self.sampling = dict(sampling="fixed", sampling_q=caps[worst] / sizes[worst],
                                 sample_size=int(caps[worst]), population=int(sizes[worst]),
                                 accounted_cloud=data.cloud_names[worst])
        self.accountant = acct.accountant(self.dp.accountant, sampling, population=population)
        self.state = self.accountant.init()

    def restore(self, state: Optional[dict]) -> None:
        if state is None:
            raise ValueError("secure.dp: the checkpoint holds no accountant state; it was written without "
                             "DP, so resuming it with secure.dp.enabled=true would under-count privacy loss")
        self.state = dict(state)

    def epsilon(self) -> float:
        return acct.epsilon(self.state, self.dp.delta) if self.state.get("rounds", 0) else 0.0

    def would_exceed(self) -> bool:
        """True when one more round would take epsilon past secure.dp.target_epsilon (if set)."""
        if self.dp.target_epsilon <= 0:
            return False
        return acct.next_round_exceeds(self.state, self.dp.target_epsilon, self.dp.delta,
                                       self.dp.noise_multiplier, self.rate)

    def step(self, server_state) -> dict:
        """Accounts one round; returns the metrics to log."""
        self.state = self.accountant.update(self.state, self.dp.noise_multiplier, self.rate)
        clip = server_state.agg_state.clip
        return dict(epsilon=self.epsilon(), delta=self.dp.delta, dp_clip=float(clip),
                    noise_multiplier=self.dp.noise_multiplier, **self.sampling)

    def summary(self) -> dict:
        return dict(epsilon=self.epsilon(), delta=self.dp.delta, rounds=self.state.get("rounds", 0),
                    noise_multiplier=self.dp.noise_multiplier, **self.sampling,
                    accountant=self.dp.accountant, target_epsilon=self.dp.target_epsilon or None)
