"""Check each kernel against its reference and time it on a GPU; prints a table last.

    python -m kernels.bench                       # CUDA GPU: correctness and timings, a few minutes
    python -m kernels.bench --sweep 150           # first time tile configurations (up to 150 s), keep the best
    python -m kernels.bench --interpret --quick   # CPU: Triton's interpreter, tiny sizes, no timings

Times are triton.testing.do_bench medians (ms), launched from Python as the server launches
them; the "graph" columns replay the same calls from a CUDA graph (the GPU's own time, which
small problems hide under launch overhead otherwise). Baselines: PyTorch SDPA on a contiguous
(un-paged) copy of the keys/values, expanded to every query head, with the equivalent boolean
mask (the gather is not timed); plain-PyTorch indexing for the cache kernels. The memory
floor is the bytes a kernel must move divided by the bandwidth of one big device copy.
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch
import torch.nn.functional as F

HEAD_SHAPES = {"smollm2": (9, 3, 64), "llama-7b": (32, 32, 128)}  # (q heads, kv heads, head dim)


def random_tree_masks(num_nodes: int, rng: random.Random) -> list[int]:
    masks: list[int] = []
    for i in range(num_nodes):
        masks.append((masks[rng.randrange(i)] if i else 0) | (1 << i))
    return masks


class Case:
    """`batch` sequences of `seq_len` keys, the last `query_len` new, in a shuffled paged cache."""

    def __init__(self, batch, seq_len, query_len, heads, dtype, device, is_tree, block_size=16):
        from models.attention import build_metadata
        rng = random.Random(0)
        num_heads, num_kv_heads, head_dim = heads
        blocks_per_seq = -(-seq_len // block_size)
        ids = list(range(batch * blocks_per_seq))
        rng.shuffle(ids)
        tables = [ids[b * blocks_per_seq:(b + 1) * blocks_per_seq] for b in range(batch)]
        self.tree_masks = [random_tree_masks(query_len, rng) for _ in range(batch)] if is_tree else None
        self.md = build_metadata([query_len] * batch, [seq_len] * batch, tables, block_size,
                                 0 if is_tree else batch, self.tree_masks, device=device)
        shape = (len(ids), block_size, num_kv_heads, head_dim)
        self.k_cache = torch.randn(shape, device=device).to(dtype)
        self.v_cache = torch.randn(shape, device=device).to(dtype)
        self.q = torch.randn(batch * query_len, num_heads, head_dim, device=device).to(dtype)
        self.shape = (batch, seq_len, query_len, heads)

    def sdpa_inputs(self):
        """Dense [B, Hq, L, D] keys/values, [B, Hq, Q, D] queries and the [B, 1, Q, L] mask."""
        batch, seq_len, query_len, (num_heads, num_kv_heads, head_dim) = self.shape
        tables = self.md.block_tables.long()

        def dense(cache):
            rows = cache[tables].flatten(1, 2)[:, :seq_len]                   # [B, L, Hkv, D]
            return rows.transpose(1, 2).repeat_interleave(num_heads // num_kv_heads, 1).contiguous()

        q = self.q.view(batch, query_len, num_heads, head_dim).transpose(1, 2)
        new_index = torch.arange(seq_len, device=q.device) - (seq_len - query_len)
        if self.tree_masks is None:
            visible = new_index[None, :] <= torch.arange(query_len, device=q.device)[:, None]
            mask = visible.expand(batch, 1, query_len, seq_len)
        else:
            words = self.md.tree_mask.view(batch, query_len, 1)
            visible = ((words >> new_index.clamp(0, 63)) & 1) != 0
            mask = (visible | (new_index < 0))[:, None]
        return q, dense(self.k_cache), dense(self.v_cache), mask.contiguous()

    def kv_bytes(self) -> int:
        batch, seq_len, _, (_, num_kv_heads, head_dim) = self.shape
        return 2 * batch * seq_len * num_kv_heads * head_dim * self.q.element_size() + 2 * self.q.nbytes


def measure(fn, timed: bool, graph: bool = False) -> float | None:
    """Median ms of fn: launched from Python as a server does, or (graph) replayed from a CUDA
    graph, which leaves the GPU time alone (small problems are launch-bound otherwise)."""
    if not timed:
        fn()
        return None
    import triton.testing
    if graph:
        try:
            return triton.testing.do_bench_cudagraph(fn, return_mode="median")
        except Exception as e:  # a capture that fails leaves its column empty, not the table
            print(f"graph capture failed: {type(e).__name__}: {e}"[:200], flush=True)
            return None
    return triton.testing.do_bench(fn, return_mode="median")


def device_bandwidth(device) -> float:
    """Bytes per ms of one big copy (read + write)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    return 2 * src.nbytes / measure(lambda: dst.copy_(src), True)


def attention_runner(case: Case):
    """-> (run: writes our kernel's output into out, out poisoned with NaN, PyTorch reference output)."""
    from kernels.prefill_attention import prefill_attention, prefill_attention_reference
    from kernels.tree_attention import tree_attention, tree_attention_reference
    md, q = case.md, case.q
    batch, seq_len, query_len, _ = case.shape
    out = torch.full_like(q, float("nan"))
    if case.tree_masks is not None:
        def run():
            tree_attention(q, case.k_cache, case.v_cache, out, md.block_tables, md.seq_lens, md.cu_seqlens_q,
                           md.tree_mask, 0, batch, 0, q.shape[0], query_len, seq_len)
        reference = tree_attention_reference(q, case.k_cache, case.v_cache, md.block_tables, md.seq_lens,
                                             md.cu_seqlens_q, md.tree_mask, 0, batch, 0)
    else:
        def run():
            prefill_attention(q, case.k_cache, case.v_cache, out, md.block_tables, md.seq_lens,
                              md.cu_seqlens_q, batch, query_len)
        reference = prefill_attention_reference(q, case.k_cache, case.v_cache, md.block_tables,
                                                md.seq_lens, md.cu_seqlens_q, batch)
    return run, out, reference


def max_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return (out.float() - reference.float()).abs().max().item()  # NaN (an unwritten element) stays NaN


def attention_flops(case: Case) -> int:
    batch, seq_len, query_len, (num_heads, _, head_dim) = case.shape
    return 4 * num_heads * head_dim * batch * (query_len * (seq_len - query_len) + query_len * (query_len + 1) // 2)


def bench_attention(case: Case, timed: bool, bandwidth: float | None):
    ours, out, reference = attention_runner(case)
    ours_ms = measure(ours, timed)
    error = max_error(out, reference)
    ours_graph_ms = measure(ours, timed, graph=True) if timed else None
    # The baseline must compute the same thing: its error counts as the row's error too.
    sq, sk, sv, mask = case.sdpa_inputs()
    sdpa_out = F.scaled_dot_product_attention(sq, sk, sv, attn_mask=mask).transpose(1, 2).flatten(0, 1)
    error = max(error, max_error(sdpa_out, reference))
    sdpa = lambda: F.scaled_dot_product_attention(sq, sk, sv, attn_mask=mask)  # noqa: E731
    sdpa_ms = measure(sdpa, timed)
    sdpa_graph_ms = measure(sdpa, timed, graph=True) if timed else None
    floor_ms = case.kv_bytes() / bandwidth if bandwidth else None
    return error, (ours_ms, ours_graph_ms, sdpa_ms, sdpa_graph_ms), floor_ms, attention_flops(case)


# Tile configurations tried by --sweep (after the launcher's current default), the likelier
# first: (most rows a tile, key block, warps, stages). Tree tiles over 64 rows only matter
# for groups of several query heads (a 64-node tree of a group of 1 is 64 rows).
TREE_SWEEP = [(m, n, w, s) for s in (4, 3, 2) for w in (4, 8) for n in (32, 64) for m in (128, 256, 64)]
PREFILL_SWEEP = [(m, n, w, s) for s in (2, 3) for w in (4, 8) for m in (128, 64) for n in (64, 32, 128)]
SWEEP_CASES = {"tree": (64, 8192, 64), "prefill": (1, 8192, 1024)}  # (batch, context, new tokens)


def sweep(dtype, device, bandwidth: float, seconds: float, tolerance: float) -> list[str]:
    """Time every tile configuration of both attention kernels at long context, per head
    shape; keep the fastest that matches the reference as the launcher's TILES entry."""
    import triton
    from kernels import prefill_attention, tree_attention
    from kernels.attention_tiles import head_dim_class
    lines = [f"{'kernel':<9}{'shape':<34}{'tiles':<18}{'max err':>9}{'ms':>9}  note"]
    for name, module, configs in (("tree", tree_attention, TREE_SWEEP), ("prefill", prefill_attention, PREFILL_SWEEP)):
        batch, seq_len, query_len = SWEEP_CASES[name]
        is_tree = name == "tree"
        for heads in HEAD_SHAPES.values():
            key = head_dim_class(heads[2])
            default = module.TILES[key]
            case = Case(batch, seq_len, query_len, heads, dtype, device, is_tree)
            run, out, reference = attention_runner(case)
            shape = f"B={batch} L={seq_len} Q={query_len} H={heads[0]}/{heads[1]}x{heads[2]}"
            results = []
            deadline = time.monotonic() + seconds / (2 * len(HEAD_SHAPES))  # an equal share per table
            rows_needed = triton.next_power_of_2(query_len * heads[0] // heads[1])
            tried = [c for c in configs if c != default and (not is_tree or c[0] <= max(64, rows_needed))]
            for config in [default] + tried:
                if time.monotonic() > deadline:
                    break
                module.TILES[key] = config
                out.fill_(float("nan"))
                try:
                    ms = measure(run, True)
                except Exception as e:  # out of shared memory, registers: the config does not build
                    lines.append(f"{name:<9}{shape:<34}{str(config):<18}{'-':>9}{'-':>9}  {type(e).__name__}")
                    continue
                finally:
                    module.TILES[key] = default  # until the winner is known
                error = max_error(out, reference)
                results.append((ms, config, error))
                note = (f"{case.kv_bytes() / bandwidth / ms:.0%} of copy bandwidth" if is_tree else
                        f"{attention_flops(case) / ms / 1e9:.0f} TFLOP/s")
                lines.append(f"{name:<9}{shape:<34}{str(config):<18}{error:>9.1e}{ms:>9.3f}  {note}"
                             + ("  (default)" if config == default else "")
                             + ("" if error <= tolerance else "  MISMATCH"))
            good = [r for r in results if r[2] <= tolerance]
            module.TILES[key] = min(good)[1] if good else default
            lines.append(f"{name:<9}{shape:<34}-> {module.TILES[key]}")
            del case, run, out, reference
            torch.cuda.empty_cache()
    return lines


def bench_cache_kernels(heads, dtype, device, quick: bool, timed: bool, bandwidth: float | None):
    from kernels.kv_cache import move_slots, move_slots_reference, write_kv, write_kv_reference
    _, num_kv_heads, head_dim = heads
    num_layers, num_blocks, block_size = (2, 64, 16) if quick else (32, 4096, 16)
    k_pool = torch.randn(num_layers, num_blocks, block_size, num_kv_heads, head_dim, device=device).to(dtype)
    v_pool = torch.randn_like(k_pool)
    num_tokens = 64 if quick else 64 * 64
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[::17] = -1
    k = torch.randn(num_tokens, num_kv_heads, head_dim, device=device).to(dtype)
    v = torch.randn_like(k)
    # Check one run on copies, then time (the timed runs may leave the pools in any state).
    ours_k, ours_v, expected_k, expected_v = (x[0].clone() for x in (k_pool, v_pool, k_pool, v_pool))
    write_kv(k, v, ours_k, ours_v, slots)
    write_kv_reference(k, v, expected_k, expected_v, slots)
    error = max((ours_k - expected_k).abs().max().item(), (ours_v - expected_v).abs().max().item())
    ours_ms = measure(lambda: write_kv(k, v, k_pool[0], v_pool[0], slots), timed)
    torch_ms = measure(lambda: write_kv_reference(k, v, k_pool[0], v_pool[0], slots), timed)
    moved = 4 * k.nbytes  # read and write k and v
    shape = f" H={num_kv_heads}x{head_dim}"
    rows = [("write_kv", f"{num_tokens} tokens" + shape, error, (ours_ms, None, torch_ms, None),
             moved / bandwidth if bandwidth else None, "")]
    num_moves = 16 if quick else 64 * 8  # 64 sequences accepting 8 tokens each
    src = torch.randperm(num_blocks * block_size, device=device)[:num_moves]
    dst = torch.randperm(num_blocks * block_size, device=device)[:num_moves]
    ours_k, ours_v, expected_k, expected_v = (x.clone() for x in (k_pool, v_pool, k_pool, v_pool))
    move_slots(ours_k, ours_v, src, dst)
    move_slots_reference(expected_k, expected_v, src, dst)
    error = max((ours_k - expected_k).abs().max().item(), (ours_v - expected_v).abs().max().item())
    del ours_k, ours_v, expected_k, expected_v
    ours_ms = measure(lambda: move_slots(k_pool, v_pool, src, dst), timed)
    torch_ms = measure(lambda: move_slots_reference(k_pool, v_pool, src, dst), timed)
    moved = 4 * num_layers * num_moves * num_kv_heads * head_dim * k.element_size()
    rows.append(("move_slots", f"{num_moves} rows x {num_layers} layers" + shape, error, (ours_ms, None, torch_ms, None),
                 moved / bandwidth if bandwidth else None, ""))
    return rows


def attention_cases(quick: bool):
    """(name, batch, seq_len, query_len, heads, is_tree)."""
    if quick:
        return [("tree", 2, 40, 8, HEAD_SHAPES["smollm2"], True),
                ("tree", 1, 70, 64, HEAD_SHAPES["smollm2"], True),
                ("tree", 1, 24, 4, HEAD_SHAPES["llama-7b"], True),
                ("prefill", 2, 50, 20, HEAD_SHAPES["smollm2"], False)]
    cases = []
    for heads in HEAD_SHAPES.values():
        for batch in (1, 8, 64):
            for seq_len in (512, 2048, 8192):
                cases.append(("tree", batch, seq_len, 64, heads, True))
        cases += [("prefill", 1, 2048, 2048, heads, False), ("prefill", 4, 2048, 512, heads, False),
                  ("prefill", 1, 8192, 1024, heads, False)]
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true", help="run in Triton's CPU interpreter")
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--sweep", type=float, default=0, metavar="SECONDS",
                        help="first try tile configurations for up to SECONDS and run the table with the fastest")
    args = parser.parse_args()
    if args.sweep and args.interpret:
        parser.error("--sweep times kernels: it needs a CUDA GPU, not the interpreter")
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    elif not torch.cuda.is_available():
        parser.error("no CUDA device: use --interpret --quick on a CPU")
    device = "cpu" if args.interpret else "cuda"
    dtype = getattr(torch, args.dtype)
    timed = not args.interpret
    torch.manual_seed(0)
    bandwidth = device_bandwidth(device) if timed else None
    tolerance = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 4e-2}[dtype]
    rows = []
    sweep_lines = sweep(dtype, device, bandwidth, args.sweep, tolerance) if args.sweep and timed else []
    for name, batch, seq_len, query_len, heads, is_tree in attention_cases(args.quick):
        case = Case(batch, seq_len, query_len, heads, dtype, device, is_tree)
        error, times, floor_ms, flops = bench_attention(case, timed, bandwidth)
        note = f"{flops / times[0] / 1e9:.0f} TFLOP/s" if times[0] and not is_tree else ""
        rows.append((name, f"B={batch} L={seq_len} Q={query_len} H={heads[0]}/{heads[1]}x{heads[2]}",
                     error, times, None if not is_tree else floor_ms, note))
        del case
        if timed:
            torch.cuda.empty_cache()
        print(f"checked {name} {rows[-1][1]}: max err {error:.1e}", flush=True)
    for heads in HEAD_SHAPES.values():
        rows += bench_cache_kernels(heads, dtype, device, args.quick, timed, bandwidth)

    def ms(x):
        return "-" if x is None else f"{x:.3f}"

    for line in sweep_lines:
        print(line)
    print(f"\ndevice: {torch.cuda.get_device_name() if timed else 'CPU (Triton interpreter)'}, {args.dtype}"
          + (f", copy bandwidth {bandwidth / 1e6:.0f} GB/s" if bandwidth else ", no timings"))
    if timed:
        from kernels import prefill_attention, tree_attention
        print(f"tiles by head dim: tree {tree_attention.TILES}, prefill {prefill_attention.TILES}")
    print(f"{'kernel':<11}{'shape':<38}{'max err':>9}{'ours ms':>9}{'graph':>8}{'torch ms':>9}{'graph':>8}"
          f"{'floor ms':>9}{'floor/ours':>11}  note")
    failed = False
    for name, shape, error, (ours_ms, ours_graph, torch_ms, torch_graph), floor_ms, note in rows:
        failed |= not error <= tolerance
        ratio = f"{floor_ms / ours_ms:.0%}" if floor_ms and ours_ms else "-"
        print(f"{name:<11}{shape:<38}{error:>9.1e}{ms(ours_ms):>9}{ms(ours_graph):>8}{ms(torch_ms):>9}"
              f"{ms(torch_graph):>8}{ms(floor_ms):>9}{ratio:>11}  {note}{'  MISMATCH' if not error <= tolerance else ''}")
    if failed:
        raise SystemExit("some kernels do not match their reference")


if __name__ == "__main__":
    main()
