"""An in-process Grid: the ServerApp's strategy talks to ClientApp nodes that run in this process, one after
another - Flower's message flow (the same ServerApp code, ClientApp handlers, records, Context per node whose
`state` persists across rounds) without Ray's start-up of one worker process per client.

On a small CPU machine Ray's workers take tens of seconds to start and import torch for every simulation; the
sequential engine spends that time training instead, which is what `fedcl demo` and the CPU-sized benchmarks want.
`fedcl.flower.simulation.simulate(..., engine="ray")` still runs Flower's simulation engine.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from time import monotonic

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity


class LocalGrid(Grid):
    """`n_nodes` ClientApp nodes in this process; node i has node config `partition-id=i`, `num-partitions=n`.

    A handler that raises gives an error reply with the reason, as on a SuperNode (the round goes on).
    """

    def __init__(self, client_app: ClientApp, n_nodes: int, run_id: int = 1) -> None:
        if n_nodes < 1:
            raise ValueError(f"n_nodes must be >= 1, got {n_nodes}")
        self.client_app, self._run = client_app, Run.create_empty(run_id)
        self.contexts = {1000 + i: Context(run_id=run_id, node_id=1000 + i,
                                           node_config={"partition-id": i, "num-partitions": n_nodes},
                                           state=RecordDict(), run_config={}) for i in range(n_nodes)}
        self._ids = itertools.count(1)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0  # the ServerApp's identity

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id,
                       ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid answers messages synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid answers messages synchronously: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Deliver the messages to their nodes' ClientApps in turn and return the replies that came within `timeout`
        seconds of the call (all of them when `timeout` is None).

        As on a deployed Grid, the timeout bounds the whole exchange: once the deadline has passed, later messages
        are not delivered, and a reply finished after it is dropped - the caller sees those nodes not answering.
        """
        deadline = None if timeout is None else monotonic() + timeout
        replies = []
        for message in messages:
            if deadline is not None and monotonic() >= deadline:
                break
            reply = self._deliver(message)
            if deadline is None or monotonic() <= deadline:
                replies.append(reply)
        return replies

    def _deliver(self, message: Message) -> Message:
        message.metadata.__dict__["_message_id"] = f"local-{next(self._ids)}"
        try:
            return self.client_app(message, self.contexts[message.metadata.dst_node_id])
        except Exception as err:  # noqa: BLE001 - reported to the strategy as a failed client, like a SuperNode
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}")
            return Message(error, reply_to=message)
