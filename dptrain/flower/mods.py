"""``epsilon_mod``: a Flower ClientApp mod (flwr 1.42) for clients that train with Opacus' DP-SGD: every
train reply carries the client's epsilon so far, composed over all the rounds the node trained in.

The ClientApp hands its Opacus accountant to ``record_accountant`` after training; the charges (Opacus'
``history`` of (noise multiplier, sample rate, steps)) are kept in the node's ``context.state``, which
Flower keeps across rounds, so a fresh accountant each round still composes with the earlier ones.
"""

from __future__ import annotations

import json
from typing import Callable

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord
from opacus.accountants import IAccountant, create_accountant

ACCOUNTANT_KEY = "dptrain.accountant"


def record_accountant(context: Context, accountant: IAccountant) -> None:
    """Add the charges of ``accountant`` (this round's) to the node's record in ``context.state``."""
    history = composed_accountant(context, accountant.mechanism()).history + list(accountant.history)
    context.state[ACCOUNTANT_KEY] = ConfigRecord(
        {"mechanism": accountant.mechanism(), "history": json.dumps([list(step) for step in history])}
    )


def composed_accountant(context: Context, mechanism: str | None = None) -> IAccountant:
    """An Opacus accountant holding every charge recorded on this node (none yet: an empty one of
    ``mechanism``). Mixing accountants across rounds is refused: their epsilons do not compose."""
    record = context.state.get(ACCOUNTANT_KEY)
    if record is None:
        if mechanism is None:
            raise RuntimeError("epsilon_mod: the ClientApp recorded no accountant; call record_accountant after training")
        return create_accountant(mechanism)
    if mechanism is not None and record["mechanism"] != mechanism:
        raise ValueError(f"record_accountant: this node accounts with {record['mechanism']!r}, not {mechanism!r}")
    accountant = create_accountant(str(record["mechanism"]))
    accountant.history = [tuple(step) for step in json.loads(str(record["history"]))]
    return accountant


def epsilon_mod(delta: float, metrics_key: str = "metrics") -> Callable[[Message, Context, Callable], Message]:
    """The mod: after the ClientApp answers a train message, put ``epsilon`` (the node's composed
    accountant at ``delta``) into the reply's ``metrics_key`` MetricRecord, so a strategy sees each
    client's spend (e.g. to stop a client beyond its budget). Other messages pass unchanged."""

    def mod(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(message, context)
        if message.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        if metrics_key not in reply.content:
            reply.content[metrics_key] = MetricRecord()
        reply.content[metrics_key]["epsilon"] = composed_accountant(context).get_epsilon(delta)
        return reply

    return mod
