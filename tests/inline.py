"""An in-process stand-in for Flower's Grid, for fast tests of the server and client halves.

It hands each message to the real ClientApp object (``app(message, context)``)
with one persistent Context per node, exactly the calls Flower's simulation
engine makes, but without Ray, so unit tests run in milliseconds.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity


def set_task_identity() -> None:
    """What Flower's engine sets in a ServerApp process before any Message is built."""
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1


class InlineGrid:
    def __init__(self, client_app, num_nodes: int, *, first_node_id: int = 1000) -> None:
        set_task_identity()
        self.app = client_app
        self.contexts = {
            first_node_id + 7 * i: Context(
                run_id=1,
                node_id=first_node_id + 7 * i,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }
        self.sent: list[Message] = []
        self.fail_nodes: set[int] = set()

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            ctx = self.contexts[msg.metadata.dst_node_id]
            if msg.metadata.dst_node_id in self.fail_nodes:
                replies.append(Message(Error(code=0, reason="injected failure"), reply_to=msg))
                continue
            try:
                replies.append(self.app(msg, ctx))
            except Exception as err:  # the engine turns a client exception into an error reply
                replies.append(Message(Error(code=0, reason=repr(err)), reply_to=msg))
        return list(reversed(replies))


def run_inline(scenario, run_dir=None, *, grid_cls=InlineGrid):
    """Run a scenario's rounds in-process; return (rows, driver, grid)."""
    from fedopt.clientapp import make_client_app
    from fedopt.server import RoundDriver
    from fedopt.task import build_task

    task = build_task(scenario)
    raw = scenario.to_dict()
    grid = grid_cls(make_client_app(lambda ctx: {"": raw}), task.num_clients)
    rows = []
    driver = RoundDriver(task, emit=rows.append)
    driver.run(grid)
    return rows, driver, grid


def scenario_with(raw, **sets):
    """Parse ``raw`` with ``section__key=value`` overrides (test shorthand)."""
    from fedopt.config import parse_scenario

    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for key, value in sets.items():
        section, field = key.split("__")
        raw.setdefault(section, {})[field] = value
    return parse_scenario(raw)


def strip_wall(rows):
    """Rows without wall-clock fields, for determinism comparisons."""
    return [{k: v for k, v in r.items() if not k.startswith("wall")} for r in rows]
