"""The products SAM 2 tracking is made of, float32 against the cheaper arithmetic on offer.

Times, on this CPU, each product behind a tracking step of ``sam2.1_hiera_tiny`` at 1024 px and
its alternatives, to say which precision or factoring could speed tracking up here:

- a Hiera MLP ``nn.Linear`` (4096 tokens, 768 -> 3072): float32 vs int8 dynamic quantisation
  (``napari_sam.speed.int8.DynamicInt8Linear``);
- one memory-attention cross-attention (4096 queries over 7 memory frames of 4096 tokens plus
  64 object-pointer tokens, one 256-wide head) through ``scaled_dot_product_attention``: float32,
  bfloat16, float16;
- the same with the value projection factored out of the attention (values 64 wide, as the
  memories are before ``v_proj``; exact in arithmetic): the SDPA math path and a query-chunked
  softmax between two GEMMs;
- its ``Q K^T`` alone, float32 GEMM vs ``torch._int_mm`` (int8) on a quarter of the queries.

    PYTHONPATH=src python bench/bench_products.py [--threads 2] [--repeats 3]

Best of ``--repeats`` after one warm-up call each, seconds.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

QUERIES, KEYS, WIDTH, MEM_WIDTH = 4096, 7 * 4096 + 64, 256, 64


def best(fn: Callable[[], object], repeats: int) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` after one warm-up call, seconds."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def chunked_attention(
    q: torch.Tensor, k: torch.Tensor, x: torch.Tensor, chunk: int
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) x`` (2-D tensors), ``chunk`` queries at a time."""
    scaled = q * q.shape[-1] ** -0.5
    out = q.new_empty(q.shape[0], x.shape[-1])
    for i in range(0, q.shape[0], chunk):
        torch.mm(torch.softmax(scaled[i : i + chunk] @ k.t(), dim=-1), x, out=out[i : i + chunk])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from napari_sam.speed.int8 import DynamicInt8Linear, has_vnni

    r = args.repeats
    torch.manual_seed(0)
    linear = nn.Linear(768, 3072)
    int8 = DynamicInt8Linear.from_exact(linear)  # packs from versioned (non-inference) tensors
    rows = []
    with torch.no_grad():
        x = torch.randn(QUERIES, 768)
        rows.append(("Linear 4096 x 768 -> 3072, float32", best(lambda: linear(x), r)))
        label = "VNNI" if has_vnni() else "7-bit activations, no VNNI"
        rows.append((f"  int8 dynamic ({label})", best(lambda: int8(x), r)))

        q, k, v = (torch.randn(1, 1, n, WIDTH) for n in (QUERIES, KEYS, KEYS))
        mem = torch.randn(1, 1, KEYS, MEM_WIDTH)
        sdpa = F.scaled_dot_product_attention
        rows.append(("cross-attention SDPA, float32", best(lambda: sdpa(q, k, v), r)))
        for dtype in (torch.bfloat16, torch.float16):
            qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
            rows.append(
                (
                    f"  {dtype}".replace("torch.", ""),
                    best(lambda qd=qd, kd=kd, vd=vd: sdpa(qd, kd, vd), r),
                )
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SDPA says why flash is refused, at every call
            rows.append(("  values 64 wide, SDPA (math path)", best(lambda: sdpa(q, k, mem), r)))
        q2, k2, m2 = q[0, 0], k[0, 0], mem[0, 0]
        for chunk in (256, 1024):
            rows.append(
                (
                    f"  values 64 wide, {chunk}-query chunks",
                    best(lambda c=chunk: chunked_attention(q2, k2, m2, c), r),
                )
            )
        rows.append(("Q K^T alone, float32 GEMM", best(lambda: q2 @ k2.t(), r)))
        quarter = QUERIES // 4
        a, b = q2[:quarter], k2.t().contiguous()
        ai = torch.randint(-127, 128, a.shape, dtype=torch.int8)
        bi = torch.randint(-127, 128, b.shape, dtype=torch.int8)
        rows.append(("  a quarter of the queries, float32", best(lambda: a @ b, r)))
        rows.append(
            ("  a quarter of the queries, torch._int_mm", best(lambda: torch._int_mm(ai, bi), r))
        )
    for name, seconds in rows:
        print(f"{seconds:8.3f} s  {name}")


if __name__ == "__main__":
    main()
