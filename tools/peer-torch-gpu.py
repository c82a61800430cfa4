#!/usr/bin/env python3
"""The GPU peers of `rrra device-check`, on the same machine and the same shapes:
PyTorch + transformers BERT encode in bf16 (SDPA attention), a BERT-base contrastive training
step with bf16 autocast, and torch matmul + topk for search.
Random weights and data (the timings do not depend on them); prints one markdown table.
Run by tools/device-check.sh when python3 has CUDA PyTorch."""
import sys
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


def train_peer(queries=64, hard=7, length=128, reps=5):
    """One contrastive training step of BERT-base the usual PyTorch way: fp32 master weights,
    bf16 autocast, SDPA attention, dropout on, mean pooling + L2, InfoNCE over in-batch and hard
    negatives (tau 0.05), backward, gradient clipping and fused AdamW: the shape of the
    `encoder training step` rows of `rrra device-check`."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(attn_implementation="sdpa")
    model = BertModel(cfg, add_pooling_layer=False).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    seqs = queries * (2 + hard)
    ids = torch.randint(1000, 30000, (seqs, length), device=dev)
    mask = torch.ones_like(ids)
    labels = torch.arange(queries, device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).to(h.dtype)
            e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).float()
        q, d = e[:queries], e[queries:]
        loss = torch.nn.functional.cross_entropy(q @ d.T / 0.05, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = timed(step, reps)
    t, hs, i, layers = seqs * length, 768, 3072, 12
    # the model FLOPs `rrra device-check` counts (encoder_train::training_step_flops)
    flops = layers * (3 * 2 * t * (4 * hs * hs + 2 * hs * i) + 3.5 * 4 * t * length * hs)
    rows.append(("torch bf16 autocast + SDPA training step (AdamW fused, clip 1.0)",
                 f"BERT-base, {seqs} x {length} tokens", ms,
                 f"{seqs / (ms * 1e-3):.0f} sequences/s, {flops / (ms * 1e-3) / 1e12:.0f} TFLOP/s"))
    del model, opt
    torch.cuda.empty_cache()


def search_peer(n, dim, dtype, q, k, reps=10):
    corpus = torch.randn(n, dim, device=dev, dtype=dtype)
    queries = torch.randn(q, dim, device=dev, dtype=dtype)
    ms = timed(lambda: torch.topk(queries @ corpus.T, k, dim=1), reps)
    gb = n * dim * corpus.element_size() / 1e9
    rows.append((f"torch matmul + topk, {str(dtype).replace('torch.', '')}",
                 f"{n // 1000}k x {dim}, {q} queries, k {k}", ms, f"{gb / (ms * 1e-3):.0f} GB/s corpus"))
    del corpus, queries
    torch.cuda.empty_cache()


def guarded(f, *args, **kwargs):
    """Runs one peer; a failure is printed and the others still run."""
    try:
        f(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any peer's failure must not hide the rest
        failed.append(f"{f.__name__}{args}: {type(e).__name__}: {e}")
        print(f"error: {failed[-1]}", flush=True)
        torch.cuda.empty_cache()


failed = []
t0 = time.time()
guarded(encode_peer, "BERT-base", 768, 12, 12, 3072, 128, 128)
guarded(encode_peer, "BERT-base", 768, 12, 12, 3072, 32, 512)
guarded(encode_peer, "MiniLM-L6 shape, batch 1", 384, 6, 12, 1536, 1, 16, reps=50)
guarded(train_peer)
guarded(search_peer, 10_000_000, 768, torch.bfloat16, 1, 100)
guarded(search_peer, 10_000_000, 768, torch.bfloat16, 32, 100)
guarded(search_peer, 1_000_000, 384, torch.float32, 1, 100, reps=50)
guarded(search_peer, 1_000_000, 384, torch.bfloat16, 32, 2048)
guarded(search_peer, 200_000, 384, torch.float32, 1000, 10)
print(f"torch {torch.__version__} on {torch.cuda.get_device_name()} ({time.time() - t0:.0f} s)")
print("| peer | problem | ms | throughput |")
print("|---|---|---|---|")
for name, shape, ms, tp in rows:
    print(f"| {name} | {shape} | {ms:.3f} | {tp} |")
sys.exit(1 if failed else 0)
