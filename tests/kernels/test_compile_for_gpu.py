"""Compile every kernel for an H100 (sm_90) with Triton's bundled ptxas, no GPU needed, and
check that its tiles fit the multiprocessor's shared memory (in fp32 too).

The interpreter accepts code that the compiler rejects (non-constexpr globals, dtype
mismatches in tl.dot, ...). The compile runs in a subprocess because TRITON_INTERPRET=1,
set for the other tests, swaps @triton.jit for the interpreter.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r'''
from triton.backends.compiler import GPUTarget
import triton
from triton.compiler import ASTSource
from kernels import kv_cache, prefill_attention, tree_attention

def compile_for_h100(fn, types, constexprs, num_warps=4, num_stages=3):
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
    # an H100's most shared memory a block (227 KiB): more compiles, then fails at launch
    assert kernel.metadata.shared <= 232448, (fn.__name__, signature, constexprs, kernel.metadata.shared)

for dtype in ("fp16", "bf16", "fp32"):
    ptr = "*" + dtype
    attention = {"q_ptr": ptr, "k_cache_ptr": ptr, "v_cache_ptr": ptr, "out_ptr": ptr, "lse_ptr": "*fp32",
                 "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "cu_seqlens_q_ptr": "*i32",
                 "tree_mask_ptr": "*i64", "scale_log2": "fp32"}
    # each head-dim class with the tiles the launchers use (the default model's group of 3; a 7B Llama's 1)
    for head_dim, group in ((64, 3), (128, 1)):
        block_m, block_n, warps, stages = prefill_attention.TILES[head_dim]
        common = dict(GROUP=group, BLOCK_D=head_dim, BLOCK_SIZE=16, DOT_FP32=dtype == "fp32")
        compile_for_h100(prefill_attention._prefill_attention_kernel, attention,
                         dict(common, QUERIES_PER_TILE=block_m // group, BLOCK_M=block_m, BLOCK_N=block_n), warps, stages)
        block_m, block_n, warps, stages = tree_attention.TILES[head_dim]
        tiles = dict(common, QUERIES_PER_TILE=block_m // group, BLOCK_M=block_m, BLOCK_N=block_n,
                     MIN_SPLIT_BLOCKS=tree_attention.MIN_SPLIT_BLOCKS)
        compile_for_h100(tree_attention._tree_attention_kernel, attention, dict(tiles, SPLIT=False), warps, stages)
        compile_for_h100(tree_attention._tree_attention_kernel, dict(attention, out_ptr="*fp32"), dict(tiles, SPLIT=True),
                         warps, stages)
    compile_for_h100(tree_attention._merge_splits_kernel, {"partial_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": ptr},
                     dict(BLOCK_S=tree_attention.MAX_SPLITS, BLOCK_D=128))
    compile_for_h100(kv_cache._write_kv_kernel, {"k_ptr": ptr, "v_ptr": ptr, "k_cache_ptr": ptr, "v_cache_ptr": ptr,
                                                 "slot_mapping_ptr": "*i64"}, dict(BLOCK_H=4, BLOCK_D=64))
    compile_for_h100(kv_cache._move_slots_kernel, {"k_pool_ptr": ptr, "v_pool_ptr": ptr, "src_ptr": "*i64",
                                                   "dst_ptr": "*i64"}, dict(BLOCK_N=16, BLOCK_C=512))
print("compiled")
'''


@pytest.mark.slow
def test_kernels_compile_for_h100(tmp_path):
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(root), TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]
