"""The run's privacy ledger: a dp-accounting accountant stepped once per round, its epsilon logged,
checkpointed (as JSON in the checkpoint's metadata) and checked against a target before each round."""
from __future__ import annotations

from typing import Optional

from fedjax_llm import participation
from fedjax_llm.config import TrainConfig
from fedjax_llm.secure import accountant as acct


class Privacy:
    def __init__(self, cfg: TrainConfig, data):
        self.dp = cfg.secure.dp
        if cfg.participation.sampling == "poisson":
            self.rate, population, sampling = float(cfg.participation.fraction), None, "poisson"
        else:
            # Fixed-size sampling runs per cloud (a stratum): account the stratum with the highest rate,
            # a bound for every client.
            sizes = [int((data.client_cloud == c).sum()) for c in range(len(data.cloud_names))]
            caps = participation.per_cloud_capacity(cfg, sizes)
            worst = max(range(len(sizes)), key=lambda c: caps[c] / sizes[c])
            self.rate, population, sampling = caps[worst], sizes[worst], "fixed"
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
                    sampling_rate=self.rate, noise_multiplier=self.dp.noise_multiplier)

    def summary(self) -> dict:
        return dict(epsilon=self.epsilon(), delta=self.dp.delta, rounds=self.state.get("rounds", 0),
                    sampling_rate=self.rate, noise_multiplier=self.dp.noise_multiplier,
                    accountant=self.dp.accountant, target_epsilon=self.dp.target_epsilon or None)
