"""A plain gRPC client for kvnode in Python (code generated from proto/kv.proto).

Usage: kv_client.py HOST:PORT KEY VALUE — puts KEY=VALUE and reads it back (linearizable)
through whichever node HOST:PORT is; the node forwards to the shard's leader as needed.
"""
import sys

import grpc
import kv_pb2
import kv_pb2_grpc


def main() -> None:
    addr, key, value = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
    with grpc.insecure_channel(addr) as channel:
        kv = kv_pb2_grpc.KvStub(channel)
        put = kv.Put(kv_pb2.PutRequest(key=key, value=value), timeout=10)
        print(f"put ok shard={put.receipt.shard} index={put.receipt.index}")
        got = kv.Get(
            kv_pb2.GetRequest(
                key=key,
                options=kv_pb2.ReadOptions(level=kv_pb2.LINEARIZABLE),
            ),
            timeout=10,
        )
        r = got.receipt
        print(f"get {got.value.value.decode()} version={got.value.version} "
              f"level={kv_pb2.ReadLevel.Name(r.level)} node={r.node} shard={r.shard}")


if __name__ == "__main__":
    main()
