"""Registers, stack (spills) and shared memory of the Triton attention kernel compiled for sm_90, on any machine.

    .venv/bin/python bench/attention_registers.py                     # this checkout's kernel
    PYTHONPATH=/path/to/other/checkout .venv/bin/python bench/attention_registers.py

Compiles `kernels.triton_attention._attn_fwd_kernel` ahead of time (`triton.compile` with a `GPUTarget`, no GPU
needed) at head dim 128 with the key padding mask (MASK=0 drops it), for pointer loads and TMA descriptor loads, and
reads the cubin with the `cuobjdump` bundled with Triton: REG, STACK and the STL/LDL (spill) counts of the SASS.
Unit strides are specialised as Triton does at launch (stride 1 for D; for FP8 V, stored token-minor, for N).
"""

import os
import pathlib
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import aptserve.kernels.triton_attention as ta

fn = ta._attn_fwd_kernel
MASK = bool(int(os.environ.get("MASK", "1")))
bindir = pathlib.Path(triton.__file__).parent / "backends/nvidia/bin"


def usage(fp8, bm, bn, warps, stages, tma, mask=MASK):
    dt = "fp8e4nv" if fp8 else "bf16"
    names = fn.arg_names
    ptrs = {
        "Q": "*" + dt,
        "K": "*" + dt,
        "V": "*" + dt,
        "Out": "*bf16",
        "MASK": "*u8",
        "Q_SCALE": "*fp32",
        "K_SCALE": "*fp32",
        "V_SCALE": "*fp32",
    }
    consts = {
        "HEAD_DIM": 128,
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "HAS_MASK": mask,
        "IS_FP8": fp8,
        "FP8_BLOCK": 128,
        "LOG2_P_SCALE": 8.807 if fp8 else 0.0,
        "INTERPRETER": False,
        "USE_TMA": tma,
    }
    consts.update({"stride_qd": 1, "stride_kd": 1, "stride_od": 1})
    consts.update({"stride_vn": 1} if fp8 else {"stride_vd": 1})
    if tma:
        ptrs.update(
            {
                "DESC_Q": f"tensordesc<{dt}[1,1,{bm},128]>",
                "DESC_K": f"tensordesc<{dt}[1,1,{bn},128]>",
                "DESC_V": f"tensordesc<{dt}[1,1,128,{bn}]>" if fp8 else f"tensordesc<{dt}[1,1,{bn},128]>",
            }
        )
    else:
        consts.update({"DESC_Q": None, "DESC_K": None, "DESC_V": None})
    sig = {n: ptrs.get(n) or ("constexpr" if n in consts else ("fp32" if n == "qk_scale" else "i32")) for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items() if k in names})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    d = tempfile.mkdtemp()
    f = os.path.join(d, "k.cubin")
    Path(f).write_bytes(k.asm["cubin"])
    out = subprocess.run([str(bindir / "cuobjdump"), "--dump-resource-usage", f], capture_output=True, text=True)
    res = [line.strip().split(" SHARED")[0] for line in out.stdout.splitlines() if "REG" in line]
    sass = subprocess.run([str(bindir / "cuobjdump"), "--dump-sass", f], capture_output=True, text=True).stdout
    return f"STL {sass.count('STL')} LDL {sass.count('LDL')} {res[0] if res else '?'} smem {k.metadata.shared} gmma {sass.count('GMMA')} UTMALDG {sass.count('UTMALDG')} lines {sass.count(chr(10))}"


for tma in (False, True) if "USE_TMA" in fn.arg_names else (False,):
    for cfg in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]:
        for fp8 in (True, False):
            try:
                print("tma" if tma else "ptr", "fp8 " if fp8 else "bf16", cfg, usage(fp8, *cfg, tma))
            except Exception as e:
                print("tma" if tma else "ptr", "fp8" if fp8 else "bf16", cfg, "FAIL", str(e).splitlines()[-1][:200])
