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
        self.received: list[Message] = []
        self.fail_nodes: set[int] = set()
        self.fail_cids: set[int] = set()
        self.pushed = 0
        self._replies: dict[str, Message] = {}

    def get_node_ids(self):
        return list(self.contexts)

    @staticmethod
    def _record(msg, into):
        """Keep what each client was sent or answered (a pack's clients one by one)."""
        from fedopt import transport
        from fedopt.clientapp import with_content

        if not msg.has_error() and transport.is_pack(msg.content):
            parts = transport.unpack_content(msg.content).values()
            into.extend(with_content(msg, c) for c in parts)
        else:
            into.append(msg)

    def handle(self, msg):
        """What the node answers (an error reply when it or one of ``fail_cids`` fails)."""
        from flwr.app import ConfigRecord

        from fedopt import transport
        from fedopt.clientapp import with_content

        failure = Message(Error(code=0, reason="injected failure"), reply_to=msg)
        if msg.metadata.dst_node_id in self.fail_nodes:
            return failure
        config = msg.content.get("config")
        if config is not None and int(config.get("cid", -1)) in self.fail_cids:
            return failure
        bad = []
        if transport.is_pack(msg.content) and self.fail_cids:
            parts = transport.unpack_content(msg.content)
            bad = sorted(set(parts) & self.fail_cids)
            keep = {c: v for c, v in parts.items() if c not in self.fail_cids}
            reduce = transport.pack_reduce(msg.content)
            msg = with_content(msg, transport.pack_content(keep, reduce=reduce))
        try:
            reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as err:  # the engine turns a client exception into an error reply
            return Message(Error(code=0, reason=repr(err)), reply_to=msg)
        if bad:
            errors = reply.content.get(transport.PACK_ERRORS_KEY, ConfigRecord())
            for cid in bad:
                errors[f"c{cid}"] = "injected failure"
            reply.content[transport.PACK_ERRORS_KEY] = errors
        return reply

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.pushed += 1
            msg_id = f"m{self.pushed}"
            msg.metadata.__dict__["_message_id"] = msg_id
            self._record(msg, self.sent)
            self._replies[msg_id] = reply = self.handle(msg)
            self._record(reply, self.received)
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids):
        out = [self._replies.pop(i) for i in list(message_ids) if i in self._replies]
        return list(reversed(out))

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


#: The noise key of in-process test runs of secret scenarios (fixed, so runs compare bitwise).
TEST_KEY_BYTES = bytes(range(32))


def noise_keys_for(scenario, key=None):
    """(the run's key, the ``noise_keys`` mapping of its ClientApp), as ``run_batch`` makes them.

    A secret scenario gets ``key`` or the fixed test key; a replayable one gets none.
    """
    from fedopt.privacy.secrecy import NoiseKey, wants_secret

    if not wants_secret(scenario):
        return None, None
    key = key if key is not None else NoiseKey(TEST_KEY_BYTES)
    return key, {"": key}


def run_inline(scenario, run_dir=None, *, grid_cls=InlineGrid, noise_key=None):
    """Run a scenario in-process with its strategy's driver; return (rows, driver, grid).

    A secret scenario's clients and driver share ``noise_key`` (default: the
    fixed test key), exactly as ``run_batch`` shares a fresh one.
    """
    from fedopt.clientapp import make_client_app
    from fedopt.registry import STRATEGIES
    from fedopt.server import RoundDriver
    from fedopt.task import build_task

    task = build_task(scenario)
    raw = scenario.to_dict()
    key, keys = noise_keys_for(scenario, noise_key)
    grid = grid_cls(make_client_app(lambda ctx: {"": raw}, noise_keys=keys), task.num_clients)
    rows = []
    driver_cls = getattr(STRATEGIES.get(scenario.strategy.name).obj, "driver", RoundDriver)
    driver = driver_cls(task, emit=rows.append)
    driver.bind_noise_key(key)
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


def method_raw(base, kind, name):
    """``base`` running strategy or client ``name`` (``kind``) with the partner it requires.

    Loops where every client trains every round (asynchronous, decentralized)
    get no ``clients_per_round``.
    """
    from fedopt.registry import CLIENTS, STRATEGIES

    registry = STRATEGIES if kind == "strategy" else CLIENTS
    raw = {**base, **getattr(registry.get(name).obj, "requires", {})}
    if not (kind == "client" and name == base.get("client", {}).get("name")):
        raw[kind] = {"name": name}
    strategy = raw.get("strategy", {}).get("name", "fedavg")
    if getattr(STRATEGIES.get(strategy).obj, "driver", None):
        raw["run"] = {k: v for k, v in base["run"].items() if k != "clients_per_round"}
    return raw


def execute_inline(scenario, run_dir, *, noise_key=None):
    """``simulation.execute_run`` of ``scenario`` into ``run_dir`` on an InlineGrid (no Ray)."""
    from fedopt.clientapp import make_client_app
    from fedopt.simulation import execute_run
    from fedopt.task import build_task

    task = build_task(scenario)
    raw = scenario.to_dict()
    _, keys = noise_keys_for(scenario, noise_key)
    grid = InlineGrid(make_client_app(lambda ctx: {"": raw}, noise_keys=keys), task.num_clients)
    return execute_run(grid, task, run_dir)
