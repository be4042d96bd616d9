"""One actor of tests/integration/test_weightsync.py, run as a subprocess: `python weightsync_actor.py
--endpoint E --actor-id A --model DIR --out DIR [--stall-after B]`.

It registers over a ZeroMQ DEALER, then answers each WeightAnnounce by receiving the weights
(WeightReceiver, gloo) into a tiny HF model, saving them to OUT/<actor>_v<version>.pt and acking;
a Shutdown ends it. With --stall-after B it touches OUT/<actor>_stalled after bucket B and sleeps
until the test SIGKILLs it.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

import torch
import zmq
from transformers import AutoModelForCausalLM

from common.wire import Register, Shutdown, WeightAck, WeightAnnounce, decode_message, encode_message
from weightsync.errors import WeightSyncError
from weightsync.receiver import WeightReceiver


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--actor-id", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--stall-after", type=int, default=-1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    out = Path(args.out)

    def on_bucket(b: int, n: int) -> None:
        if b == args.stall_after:
            (out / f"{args.actor_id}_stalled").touch()
            time.sleep(3600)  # stalled until the test SIGKILLs this process

    def load(named) -> None:  # the HF engine's in-place copy
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, t in named:
                params[name].data.copy_(t)

    receiver = WeightReceiver(on_bucket=on_bucket)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, args.actor_id.encode())
    dealer.setsockopt(zmq.LINGER, 1000)
    dealer.connect(args.endpoint)
    dealer.send(encode_message(Register(actor_id=args.actor_id, incarnation_seen=-1, version=-1, pid=os.getpid(),
                                        hostname=socket.gethostname(), engine="hf",
                                        vocab_size=model.config.vocab_size, has_cuda=False)))
    while True:
        msg = decode_message(dealer.recv())
        if isinstance(msg, Shutdown):
            break
        if not isinstance(msg, WeightAnnounce):
            continue
        try:
            checksum, seconds = receiver.receive(msg, load, read_back=model.named_parameters)
            torch.save({n: p.detach().clone() for n, p in model.named_parameters()},
                       out / f"{args.actor_id}_v{msg.version}.pt")
            ack = WeightAck(actor_id=args.actor_id, sync_id=msg.sync_id, version=msg.version, ok=True,
                            checksum=checksum, load_seconds=seconds, error="")
        except WeightSyncError as e:
            ack = WeightAck(actor_id=args.actor_id, sync_id=msg.sync_id, version=msg.version, ok=False,
                            checksum="", load_seconds=0.0, error=str(e)[:4000])
        dealer.send(encode_message(ack))
    dealer.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
