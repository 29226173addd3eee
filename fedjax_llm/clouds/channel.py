"""The cloud boundary: every pytree that crosses between a cloud and the aggregator goes through here.

A `Channel` turns a tree into bytes for one hop (`send`) and bytes back into a tree (`receive`). The
plaintext channel only serializes and checks routing; the secure layer provides a sealing channel with
the same two functions, so the round code does not change, and a `broadcast` that serializes a tree
sent to every cloud once and seals it per recipient.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Protocol, Sequence

from fedjax_llm.clouds import message


class SendFn(Protocol):
    def __call__(self, tree: Any, *, sender: str, recipient: str, round: int,
                 meta: Mapping[str, str] | None = None) -> bytes: ...


class ReceiveFn(Protocol):
    def __call__(self, data: bytes, *, like: Any, sender: str, recipient: str,
                 round: int) -> tuple[Any, dict[str, str]]: ...


class BroadcastFn(Protocol):
    def __call__(self, tree: Any, *, sender: str, recipients: Sequence[str], round: int,
                 meta: Mapping[str, str] | None = None) -> dict[str, bytes]: ...


class Channel(NamedTuple):
    send: SendFn
    receive: ReceiveFn
    # One tree to several recipients, serialized once (None: one `send` per recipient).
    broadcast: Optional[BroadcastFn] = None


class RoutingError(message.MessageError):
    """A message whose header names another sender, recipient or round than expected."""


def plaintext_channel() -> Channel:
    """Serialize-only channel: the wire format with its routing header, no protection."""

    def send(tree, *, sender, recipient, round, meta=None):
        header = {"sender": sender, "recipient": recipient, "round": str(round), **(meta or {})}
        return message.encode(tree, header)

    def receive(data, *, like, sender, recipient, round):
        tree, meta = message.decode(data, like)
        expected = {"sender": sender, "recipient": recipient, "round": str(round)}
        for key, value in expected.items():
            if meta.get(key) != value:
                raise RoutingError(f"round {round}: message from {sender!r} to {recipient!r} has "
                                   f"{key}={meta.get(key)!r}, expected {value!r}")
        return tree, meta

    return Channel(send=send, receive=receive)
