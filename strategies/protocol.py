"""The records the server and the clients exchange, and how one instruction message is built.

Every message gets its own RecordDict (Flower's FedAvg sends one RecordDict object to every node
and edits its config in place); the arrays inside may be one shared, unmodified ArrayRecord.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

ARRAYS = "arrays"
METRICS = "metrics"
CONFIG = "config"
#: Optional reply record naming the client's ``group`` (its architecture in a ``model-family``
#: run); the strategy then also records the mean accuracy per group (``acc_per_group``).
CLIENT_INFO = "client-info"
#: With fused evaluation: a train reply's evaluation of the previous round (accuracy,
#: num-examples, eval-loss), and the train config key naming that round.
EVALUATION = "evaluation"
EVALUATE_ROUND = "evaluate-round"
#: With ``evaluate-at`` after training: a train reply's evaluation of the model its local training
#: left (accuracy, num-examples, eval-loss), before aggregation.
TRAINED_EVALUATION = "after-training"
#: Optional train-reply record of a method's own figures (``MethodClient.train_metrics``: pFedGate's
#: sparse-model cost); the strategy records their mean over the participants that sent each one
#: (``method_metrics`` in the round's row).
METHOD_METRICS = "method-metrics"
#: Message config key telling a client how to fail (fault injection, ``strategies.faults``).
FAULT = "fault"
#: Reply record of a modelled straggler (``fault-kind = "timeout"``): the server treats the reply
#: as one that arrived after ``round-timeout``.
MODELLED_TIMEOUT = "modelled-timeout"


def instruction(node_id: int, message_type: str, arrays: ArrayRecord, config: Mapping) -> Message:
    """A message to one node, in a fresh RecordDict with its own copy of ``config``."""
    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(dict(config))})
    return Message(content=content, dst_node_id=node_id, message_type=message_type)
