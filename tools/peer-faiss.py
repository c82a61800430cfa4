#!/usr/bin/env python3
"""Peer figures for the top-k workloads (../shared/bench/README.md): faiss-cpu IndexFlatIP on
200 000 x 384 standard-normal unit vectors and 1 000 unit queries, k = 10, run in the same
session as `rrra bench --only topk-batch,topk-single` so the two can be compared as a ratio.

    python3 -m venv /tmp/peer && /tmp/peer/bin/pip install faiss-cpu numpy
    /tmp/peer/bin/python tools/peer-faiss.py [--threads 2]
"""
import argparse
import time

import faiss
import numpy as np

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--reps", type=int, default=3)
a = ap.parse_args()
faiss.omp_set_num_threads(a.threads)

rng = np.random.default_rng(1)
xb = rng.standard_normal((200_000, 384), dtype=np.float32)
xb /= np.linalg.norm(xb, axis=1, keepdims=True)
xq = np.random.default_rng(2).standard_normal((1_000, 384), dtype=np.float32)
xq /= np.linalg.norm(xq, axis=1, keepdims=True)
index = faiss.IndexFlatIP(384)
index.add(xb)


def median_time(f, reps):
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


t = median_time(lambda: index.search(xq, 10), max(a.reps, 3))
print(f"| topk-batch | faiss-cpu {faiss.__version__} IndexFlatIP | {1000 / t:.1f} queries/s |")
few = xq[:100]
t = median_time(lambda: [index.search(few[i : i + 1], 10) for i in range(100)], a.reps)
print(f"| topk-single | faiss-cpu {faiss.__version__} IndexFlatIP | {100 / t:.1f} queries/s |")
