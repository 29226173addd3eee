"""The federation's public names, kept where callers import them from.

A round is two halves now: the cloud half (`fedjax_llm.cloud`) and the aggregator half
(`fedjax_llm.aggregator`), wired in one process by `fedjax_llm.simulate.Federation`.
"""
from fedjax_llm.aggregator import AggregatorState, NonFiniteError, QuorumError
from fedjax_llm.cloud import CloudState
from fedjax_llm.simulate import Federation, FederationState, lora_scheme, make_mesh

__all__ = ["AggregatorState", "CloudState", "Federation", "FederationState", "NonFiniteError", "QuorumError",
           "lora_scheme", "make_mesh"]
