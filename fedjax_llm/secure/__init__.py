"""The secure communication layer: identities, sealed messages and channel, compression, secure
aggregation, client-level DP and privacy accounting. Each module has one job; see its docstring."""
from fedjax_llm.secure.channel import ChannelState, SealConfig, sealed_channel
from fedjax_llm.secure.keys import (Identity, IdentityError, PublicIdentity, generate_identities,
                                    load_identities, load_trust, trust_of)

__all__ = ["ChannelState", "SealConfig", "sealed_channel", "Identity", "IdentityError",
           "PublicIdentity", "generate_identities", "load_identities", "load_trust", "trust_of"]
