"""A Flower Grid that delivers messages to a ClientApp in this process (no Ray, no SuperLink).

It lets tests drive the real ServerApp and ClientApp functions for several clients in a few
seconds, deterministically. ``failing`` partition ids reply with an error instead, and so does a
ClientApp that raises (as Flower's runtime does).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from itertools import count

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: Mapping, failing: Iterable[int] = ()) -> None:
        self.client_app = client_app
        # Message() stamps the identity of the task running in this process.
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.failing = set(failing)
        self.contexts = {
            1000 + pid: Context(
                run_id=1,
                node_id=1000 + pid,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for pid in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self._ids = count()
        self._run = None

    @property
    def run(self):
        return self._run

    def set_run(self, run_id: int) -> None:
        self._run = run_id

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            message_id = f"m{next(self._ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            if context.node_config["partition-id"] in self.failing:
                reply = Message(Error(code=0, reason="injected failure"), reply_to=message)
            else:
                try:
                    reply = self.client_app(message, context)
                except Exception as err:  # noqa: BLE001 - Flower's runtime turns a ClientApp exception into an error reply
                    reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=message)
            self._replies[message_id] = reply
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(message_id) for message_id in message_ids]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
