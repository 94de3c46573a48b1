"""PyTorch CPU peer for bench/backward.sh: autograd's backward of the same ops.

    backward_torch.py matmul T K N            y = x·Wᵀ; y.backward(dy): dx and dW
    backward_torch.py attention T NH NKV D    causal scaled_dot_product_attention
                                              (GQA), backward only
Prints key=value lines: best of 7 windows of >= 50 ms, in ms; threads: $BENCH_THREADS
(default: all cores); BENCH_CLOCK=cpu: the process's CPU time instead of the wall clock.
"""
import os
import sys
import time

import torch


clock = time.process_time if os.environ.get("BENCH_CLOCK") == "cpu" else time.perf_counter


def best_ms(f):
    f()  # warm-up
    best = float("inf")
    for _ in range(7):
        reps, t = 0, clock()
        while True:
            f()
            reps += 1
            if clock() - t >= 0.05:
                break
        best = min(best, (clock() - t) * 1e3 / reps)
    return best


def matmul(T, K, N):
    x = torch.rand(T, K, requires_grad=True)
    w = torch.rand(N, K, requires_grad=True)
    y = torch.nn.functional.linear(x, w)
    dy = torch.rand(T, N)

    def step():
        x.grad = w.grad = None
        y.backward(dy, retain_graph=True)

    print(f"matmul_T{T}_K{K}_N{N}_torch_ms={best_ms(step):.2f}")


def attention(T, nh, nkv, D):
    q = torch.rand(1, nh, T, D, requires_grad=True)
    k = torch.rand(1, nkv, T, D, requires_grad=True)
    v = torch.rand(1, nkv, T, D, requires_grad=True)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           enable_gqa=nh != nkv)
    dout = torch.rand_like(out)

    def step():
        q.grad = k.grad = v.grad = None
        out.backward(dout, retain_graph=True)

    print(f"attention_T{T}_H{nh}_KV{nkv}_D{D}_torch_ms={best_ms(step):.2f}")


torch.set_num_threads(int(os.environ.get("BENCH_THREADS") or 0) or os.cpu_count())
{"matmul": matmul, "attention": attention}[sys.argv[1]](*map(int, sys.argv[2:]))
