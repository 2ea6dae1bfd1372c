#!/usr/bin/env python3
"""Writes a synthetic model pack of incompressible bytes for the store benchmark:
OUT/manifest.json and OUT/shards/*.bin, 64 MiB records each holding one f16 tensor `bench/tNNN` of
[32768, 1024]: the largest dense read a record allows, so the wasm heap peak is the worst case.

    python3 tests/make_bench_pack.py OUT [--mib 1088]
"""
import argparse
import hashlib
import json
import os

SHARD = 64 << 20
ROWS = 32768
TENSOR = ROWS * 1024 * 2


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mib", type=int, default=1088)
    args = parser.parse_args()
    os.makedirs(os.path.join(args.out, "shards"), exist_ok=True)
    count = (args.mib << 20) // TENSOR
    per_shard = SHARD // TENSOR
    shards, tensors = [], []
    for s in range((count + per_shard - 1) // per_shard):
        n = min(per_shard, count - s * per_shard)
        data = os.urandom(n * TENSOR)
        path = f"shards/{s:05d}.bin"
        with open(os.path.join(args.out, path), "wb") as f:
            f.write(data)
        shards.append({"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        for i in range(n):
            tensors.append({"name": f"bench/t{len(tensors):03d}", "storage": "f16", "shape": [ROWS, 1024],
                            "data": [{"shard": s, "offset": i * TENSOR, "length": TENSOR}]})
    manifest = {"format": "sdxl-pack", "version": 1, "model": "sdxl-base", "quant": "q4", "shard_bytes": SHARD,
                "shards": shards, "files": [], "tensors": tensors}
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    print(f"{args.out}: {len(tensors)} tensors, {len(shards)} shards, {sum(s['bytes'] for s in shards) >> 20} MiB")


if __name__ == "__main__":
    main()
