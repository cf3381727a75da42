"""The broadcast channel across nodes: first rank 0, then the last rank is the writer.
Readers on the writer's node read shared memory, the others zmq; every reader checks
every message, in order, including one larger than the ring. Prints one RESULT line."""
import json
import random

import distrib


def messages(seed: int) -> list:
    rng = random.Random(seed)
    sizes = [rng.choice((0, 10, 1000, 70_000, 200_000)) for _ in range(60)] + [3 << 20]  # the ring is 1 MiB
    return [{"i": i, "blob": rng.randbytes(n), "pair": [i, str(i)]} for i, n in enumerate(sizes)]


ctx = distrib.init(timeout=60)
coord = ctx.coordinator
report = {"rank": ctx.rank, "node": ctx.info.node_rank, "channels": []}
for src in (0, ctx.world_size - 1):
    with coord.broadcast_channel(src, timeout=60) as channel:
        sent = messages(src)
        if channel.is_writer:
            for message in sent:
                channel.send(message)
            ok = True
        else:
            ok = [channel.recv() for _ in sent] == sent
        report["channels"].append({"src": src, "transport": channel.transport, "ok": ok,
                                   "endpoint": channel.endpoint})
        coord.barrier()  # every reader has everything before the writer closes
print("RESULT " + json.dumps(report), flush=True)
distrib.shutdown()
