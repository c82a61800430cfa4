#!/usr/bin/env python3
"""The GPU peers of `rrra device-check`, on the same machine and the same shapes:
PyTorch + transformers BERT encode in bf16 (SDPA attention) and torch matmul + topk for search.
Random weights and data (the timings do not depend on them); prints one markdown table.
Run by tools/device-check.sh when python3 has CUDA PyTorch."""
import time

import torch

dev = "cuda"
torch.manual_seed(0)


def timed(f, reps=10):
    f()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        f()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


rows = []


def encode_peer(name, hidden, layers, heads, inter, seqs, length, reps=10):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=inter, attn_implementation="sdpa")
    model = BertModel(cfg, add_pooling_layer=False).to(dev, torch.bfloat16).eval()
    ids = torch.randint(1000, 30000, (seqs, length), device=dev)
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        ms = timed(lambda: model(input_ids=ids, attention_mask=mask), reps)
    rows.append((f"torch bf16 SDPA encode, {name}", f"{seqs} x {length} tokens", ms,
                 f"{seqs / (ms * 1e-3):.0f} sequences/s"))


def search_peer(n, dim, dtype, q, k, reps=10):
    corpus = torch.randn(n, dim, device=dev, dtype=dtype)
    queries = torch.randn(q, dim, device=dev, dtype=dtype)
    ms = timed(lambda: torch.topk(queries @ corpus.T, k, dim=1), reps)
    gb = n * dim * corpus.element_size() / 1e9
    rows.append((f"torch matmul + topk, {str(dtype).replace('torch.', '')}",
                 f"{n // 1000}k x {dim}, {q} queries, k {k}", ms, f"{gb / (ms * 1e-3):.0f} GB/s corpus"))
    del corpus, queries
    torch.cuda.empty_cache()


t0 = time.time()
encode_peer("BERT-base", 768, 12, 12, 3072, 128, 128)
encode_peer("BERT-base", 768, 12, 12, 3072, 32, 512)
encode_peer("MiniLM-L6 shape, batch 1", 384, 6, 12, 1536, 1, 16, reps=50)
search_peer(10_000_000, 768, torch.bfloat16, 1, 100)
search_peer(10_000_000, 768, torch.bfloat16, 32, 100)
search_peer(1_000_000, 384, torch.float32, 1, 100, reps=50)
search_peer(1_000_000, 384, torch.bfloat16, 32, 2048)
search_peer(200_000, 384, torch.float32, 1000, 10)
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()} ({time.time() - t0:.0f} s)")
print("| peer | problem | ms | throughput |")
print("|---|---|---|---|")
for name, shape, ms, tp in rows:
    print(f"| {name} | {shape} | {ms:.3f} | {tp} |")
