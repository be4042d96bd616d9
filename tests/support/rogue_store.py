"""A rogue client of the weight-sync rendezvous store, run as a subprocess by
tests/integration/test_weightsync.py: `python rogue_store.py --mode M --port P --out DIR ...`.

It can reach the store's port (what a NetworkPolicy should prevent) but holds nothing the CURVE
control plane hands out. It uses only torch and the public store API, as an attacker would:

* `impersonate`: touches OUT/rogue_ready, then finds a group as soon as a member's gloo address
  appears (`list_keys`), joins it as rank 0 (the learner's rank) with its own address, and
  broadcasts weights of its own (every parameter 0.25, in the layout the learner would use for
  --model) and a made-up seal. Touches OUT/rogue_formed once in the group, OUT/rogue_sent after
  the last bucket.
* `vandal`: over and over, lists every key and overwrites it (empty, short, random, another key's
  genuine value), deletes it, compare_sets it, adds to it; pre-seeds the names the old scheme
  (`ws<nonce>-<sync_id>`) would use next; floods keys; meanwhile idle connections, half-sent
  frames and clients blocked on `wait`/`get` of keys that never come hold the server. Writes its
  counts to OUT/vandal.json now and then.
* `hang`: only the holding part of `vandal` (idle, half-sent, waiting clients); touches
  OUT/rogue_holding once they are all in place.

It runs until the test kills it (by pid).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import struct
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

OLD_SCHEME = re.compile(r"^ws([0-9a-f]{6})-(\d+)/")  # the group names before the sync's secret


def client(port: int, timeout_s: float = 1.0) -> dist.TCPStore:
    return dist.TCPStore("127.0.0.1", port, None, False, timedelta(seconds=timeout_s))


def reconnect(port: int, counts: dict) -> dist.TCPStore:
    """A new connection (the server drops one it could not parse), however long it takes."""
    counts["errors"] += 1
    while True:
        try:
            return client(port)
        except Exception:  # noqa: BLE001 - a busy server: try again
            counts["reconnect_failures"] += 1
            time.sleep(0.05)


def hold(port: int, out: Path) -> list:
    """Connections that sit on the server: idle ones, half-sent frames (a command byte and a length
    that promises far more than follows), and clients blocked on keys that never come."""
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
    for cmd in range(16):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(bytes([cmd]) + struct.pack("<Q", 1 << 40) + b"half")
        held.append(s)

    def block(op: str, key: str) -> None:
        store = client(port, timeout_s=3600.0)
        while True:
            try:
                store.wait([key]) if op == "wait" else store.get(key)
            except Exception:  # noqa: BLE001 - a rogue shrugs and blocks again
                time.sleep(0.1)

    for i in range(4):
        threading.Thread(target=block, args=("wait" if i % 2 else "get", f"never/{i}"), daemon=True).start()
    time.sleep(0.5)
    (out / "rogue_holding").touch()
    return held


def impersonate(args: argparse.Namespace, out: Path) -> None:
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 -- the rogue knows the architecture

    from weightsync.layout import plan_layout  # noqa: PLC0415 -- the public layout rule

    model = AutoModelForCausalLM.from_pretrained(args.model)
    fake = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters()}
    plan = plan_layout(((n, t.shape, t.dtype) for n, t in fake.items()), max(1, int(args.bucket_mb * (1 << 20))),
                       0, solo_bytes=8 << 20)
    store = client(args.port, timeout_s=60.0)
    before = set(store.list_keys())
    (out / "rogue_ready").touch()
    group = None
    while group is None:
        for key in store.list_keys():
            if key.endswith("/0/1") and key not in before:
                group = key[: -len("/0/1")]
        time.sleep(0.002)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timedelta(seconds=60)
    opts._devices = [dist.ProcessGroupGloo.create_default_device()]
    pg = dist.ProcessGroupGloo(dist.PrefixStore(group, store), 0, 2, opts)
    (out / "rogue_formed").touch()
    bopts = dist.BroadcastOptions()
    bopts.rootRank, bopts.rootTensor = 0, 0
    for first, end, _ in plan.buckets:
        flat = torch.cat([fake[n].reshape(-1) for n in plan.names[first:end]])
        pg.broadcast([flat], bopts).wait()
    (out / "rogue_sent").touch()
    pg.broadcast([torch.randint(0, 256, (64,), dtype=torch.uint8)], bopts).wait()  # a made-up seal


def vandal(args: argparse.Namespace, out: Path) -> None:
    held = hold(args.port, out)  # noqa: F841 -- kept open until the process dies
    store = client(args.port)
    counts = {"rounds": 0, "overwritten": 0, "deleted": 0, "compare_set": 0, "added": 0, "preseeded": 0,
              "flooded": 0, "group_keys_seen": 0, "errors": 0, "reconnect_failures": 0}
    seen_groups: set[str] = set()
    junk = [b"", b"x", os.urandom(16), os.urandom(4096)]
    last_dump = 0.0
    while True:
        counts["rounds"] += 1
        try:
            keys = [k for k in store.list_keys() if not k.startswith(("never/", "flood/"))]
        except Exception:  # noqa: BLE001
            store = reconnect(args.port, counts)
            continue
        values = {}
        for i, key in enumerate(keys):
            seen_groups.add(key.split("/")[0])
            counts["group_keys_seen"] += 1
            try:
                action = (counts["rounds"] + i) % 6
                if action == 0:
                    store.set(key, junk[counts["rounds"] % len(junk)])
                    counts["overwritten"] += 1
                elif action == 1:  # a genuine value, under the wrong key (e.g. another rank's address)
                    other = keys[(i + 1) % len(keys)]
                    values.setdefault(other, store.get(other))
                    store.set(key, values[other])
                    counts["overwritten"] += 1
                elif action == 2:
                    store.delete_key(key)
                    counts["deleted"] += 1
                elif action == 3:
                    store.compare_set(key, store.get(key), os.urandom(24))
                    counts["compare_set"] += 1
                elif action == 4:
                    store.add(key, 1)  # the server refuses a non-number and drops this connection
                    counts["added"] += 1
                else:
                    store.set(key, os.urandom(64))
                    counts["overwritten"] += 1
            except Exception:  # noqa: BLE001
                store = reconnect(args.port, counts)
        for group in list(seen_groups):
            m = OLD_SCHEME.match(group + "/")
            if m is None:
                continue
            nonce, sync_id = m.group(1), int(m.group(2))
            for ahead in range(1, 4):  # the next groups' addresses, before their members write them
                for rank in range(3):
                    try:
                        store.set(f"ws{nonce}-{sync_id + ahead}/0/{rank}", b"")
                        counts["preseeded"] += 1
                    except Exception:  # noqa: BLE001
                        store = reconnect(args.port, counts)
        if counts["flooded"] < 500:
            try:
                for _ in range(50):
                    store.set(f"flood/{counts['flooded']}", os.urandom(1024))
                    counts["flooded"] += 1
            except Exception:  # noqa: BLE001
                store = reconnect(args.port, counts)
        now = time.monotonic()
        if now - last_dump > 0.2:
            last_dump = now
            tmp = out / "vandal.json.tmp"
            tmp.write_text(json.dumps({**counts, "groups": sorted(seen_groups)}))
            tmp.replace(out / "vandal.json")
        time.sleep(0.001)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("impersonate", "vandal", "hang"), required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="")
    ap.add_argument("--bucket-mb", type=float, default=1 / 64)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.mode == "impersonate":
        impersonate(args, out)
    elif args.mode == "vandal":
        vandal(args, out)
    else:
        held = hold(args.port, out)  # noqa: F841 -- kept open until the process dies
    while True:
        time.sleep(3600)  # until the test kills this process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
