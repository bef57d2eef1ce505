"""Compile every triton-backend kernel for NVIDIA targets without a GPU (to PTX and cubin with
Triton's bundled toolchain), so code that only the compiler rejects (non-constexpr globals, type
mismatches, unsupported ops) fails on a CPU machine too. The CPU interpreter runs kernels as
Python and accepts things the compiler does not.

    python -m kdkernels.backends.triton.compile_check [--all] [--arch 90,80] [--kernels a,b]

Must run without TRITON_INTERPRET (interpreted kernels cannot be compiled). Default: one launch
configuration per kernel on sm_90; --all: every divergence / tail / dtype variant the host code can
launch. Exit status 1 when any compile fails.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _configs(full: bool):
    """(kernel name, argument types, constexprs, launch options) for every variant to compile."""
    from . import dense_kernels as D, head_kernels as K, sparse_kernels as S  # noqa: E401
    dts = ("bf16", "fp32") if full else ("bf16",)
    divs = range(7) if full else (2, 6)     # 6: akl (its own branches in the terms/grad kernels)
    lin = dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64)
    logit = dict(BLOCK_N=8, BLOCK_V=1024, BLOCK_H=16)
    opts_lin = dict(num_warps=8, num_stages=3)
    opts_logit = dict(num_warps=8, num_stages=1)

    def head(dt, names):
        x, sxn, sxv, w, swv, b, h, cap = names
        return {x: PTR[dt], sxn: "i32", sxv: "i32", w: PTR[dt], swv: "i32", b: PTR[dt], h: "i32", cap: "fp32"}

    H1 = ("x_ptr", "stride_xn", "stride_xv", "w_ptr", "stride_wv", "b_ptr", "H", "cap")
    HS = ("xs_ptr", "s_sxn", "s_sxv", "ws_ptr", "s_swv", "bs_ptr", "Hs", "s_cap")
    HT = ("xt_ptr", "t_sxn", "t_sxv", "wt_ptr", "t_swv", "bt_ptr", "Ht", "t_cap")
    for dt, linear in itertools.product(dts, (True, False)):
        tiles, lopts = (lin, opts_lin) if linear else (logit, opts_logit)
        ieee = linear and dt == "fp32"
        flags = dict(LINEAR=linear, IEEE=ieee)
        yield ("_lse_kernel", D._lse_kernel,
               {**head(dt, H1), "labels_ptr": "*i64", "lse_t_ptr": "*fp32", "lse_1_ptr": "*fp32",
                "pick_ptr": "*fp32", "ids_ptr": "*i64", "stride_in": "i32", "K": "i32", "lse_o_ptr": "*fp32",
                "zk_ptr": "*fp32", "N": "i32", "V": "i32", "inv_T": "fp32", "cols_per_split": "i32",
                "n_splits": "i32"},
               {**flags, "HAS_BIAS": linear, "HAS_CAP": linear, "TWO": True, "HAS_LABEL": True,
                "HAS_IDS": linear, "KP": 64, "LOG_K": 7, **tiles},
               lopts)
        two_heads = {**head(dt, HS), **head(dt, HT)}
        caps = dict(S_BIAS=linear, S_CAP=linear, T_BIAS=False, T_CAP=linear)
        yield ("_dense_fkl_kernel", D._dense_fkl_kernel,
               {**two_heads, "labels_ptr": "*i64", "part_ptr": "*fp32", "N": "i32", "V": "i32",
                "inv_T": "fp32", "cols_per_split": "i32", "n_splits": "i32"},
               {**flags, **caps, "TWO": True, "HAS_LABEL": True, **tiles}, lopts)
        for div in divs:
            yield (f"_dense_terms_kernel[div={div}]", D._dense_terms_kernel,
                   {**two_heads, "lse_b_ptr": "*fp32", "lse_a_ptr": "*fp32", "f_ptr": "*fp32",
                    "qh_ptr": "*fp32", "tv_ptr": "*fp32", "N": "i32", "V": "i32", "inv_T": "fp32", "LOG_W": "fp32",
                    "LOG_1MW": "fp32", "cols_per_split": "i32", "n_splits": "i32"},
                   {**flags, **caps, "DIV": div, **tiles}, lopts)
            yield (f"_dense_grad_kernel[div={div}]", D._dense_grad_kernel,
                   {**two_heads, "labels_ptr": "*i64", "stats_ptr": "*fp32", "akl_ptr": "*fp32",
                    "grad_rows_ptr": "*fp32",
                    "out_ptr": PTR[dt] if not linear else "*fp32", "stride_on": "i32", "stride_ov": "i32",
                    "N": "i32", "V": "i32", "c_start": "i32", "c_end": "i32", "inv_T": "fp32",
                    "kd_coef": "fp32", "ce_w": "fp32", "LOG_W": "fp32", "LOG_1MW": "fp32"},
                   {**flags, **caps, "DIV": div, "HAS_KD": True, "HAS_CE": True, **tiles}, lopts)
    for dt in dts:
        ieee = dt == "fp32"
        for div, tail, weights in itertools.product(divs, range(3) if full else (0,), (False, True) if full else (False,)):
            for coef in (False, True):
                yield (f"_sparse_rows_kernel[div={div},tail={tail},w={weights},coef={coef}]",
                       S._sparse_rows_kernel,
                       {"zk_ptr": "*fp32", "ids_ptr": "*i64", "stride_in": "i32", "vals_ptr": "*fp32",
                        "stride_vn": "i32", "lse_ptr": "*fp32", "lse_out_ptr": "*fp32", "stats_ptr": "*fp32",
                        "out_ptr": "*fp32", "coef_ptr": "*fp32",
                        "dense_ptr": "*fp32", "N": "i32", "K": "i32", "V": "i32", "inv_T": "fp32",
                        "kd_coef": "fp32", "LOG_W": "fp32", "LOG_1MW": "fp32", "log_floor": "fp32"},
                       {"DIV": div, "TAIL": tail, "WEIGHTS": weights, "P_TAIL": tail == 0 and not weights,
                        "COEF": coef, "BLOCK_N": 32, "KP": 64}, dict(num_warps=4))
        for div in (divs if full else (divs[0], 6)):
            yield (f"_sparse_grad_kernel[div={div}]", S._sparse_grad_kernel,
                   {"h_ptr": PTR[dt], "stride_hn": "i32", "w_ptr": PTR[dt], "stride_wv": "i32", "b_ptr": PTR[dt],
                    "H": "i32", "cap": "fp32", "ids_ptr": "*i64", "stride_in": "i32", "lpk_ptr": "*fp32",
                    "dense_ptr": "*fp32", "labels_ptr": "*i64", "stats_ptr": "*fp32", "akl_ptr": "*fp32",
                    "grad_rows_ptr": "*fp32", "out_ptr": PTR[dt], "stride_on": "i32", "N": "i32", "V": "i32",
                    "K": "i32", "c_start": "i32", "c_end": "i32", "inv_T": "fp32", "kd_coef": "fp32",
                    "ce_w": "fp32", "LOG_W": "fp32", "LOG_1MW": "fp32"},
                   {"DIV": div, "HAS_KD": True, "HAS_DENSE": True, "HAS_CE": True, "HAS_BIAS": True,
                    "HAS_CAP": True, "IEEE": ieee, "LOG_K": 7, **lin}, opts_lin)
        head_args = {"h_ptr": PTR[dt], "stride_hn": "i32", "w_ptr": PTR[dt], "stride_wv": "i32",
                     "b_ptr": PTR[dt], "H": "i32", "cap": "fp32"}
        for kp in ((16, 64, 256) if full else (64,)):
            yield (f"_topk_kernel[KP={kp}]", K._topk_kernel,
                   {**head_args, "keys_ptr": "*i64", "lse_ptr": "*fp32", "N": "i32", "V": "i32", "inv_T": "fp32",
                    "cols_per_split": "i32", "n_splits": "i32"},
                   {"HAS_BIAS": True, "HAS_CAP": True, "IEEE": ieee, "KP": kp, **lin}, dict(num_warps=8))
        yield ("_sample_kernel", K._sample_kernel,
               {**head_args, "u_ptr": "*fp64", "stride_un": "i32", "out_ptr": "*i64", "lse_ptr": "*fp32",
                "N": "i32", "V": "i32", "D": "i32", "inv_T": "fp32"},
               {"HAS_BIAS": True, "HAS_CAP": True, "IEEE": ieee, "BLOCK_D": 16, "BLOCK_N": 64, "BLOCK_V": 64,
                "BLOCK_H": 64}, dict(num_warps=8))


def compile_one(kernel, types: dict, consts: dict, arch: int, options: dict):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig = {n: ("constexpr" if n in consts else types[n]) for n in kernel.arg_names}
    src = ASTSource(fn=kernel, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 64 if arch >= 90 else 32), options=options)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every variant (slow: minutes)")
    ap.add_argument("--arch", default="90", help="comma-separated SM versions, e.g. 90,80")
    ap.add_argument("--kernels", default="", help="comma-separated kernel names (default: all)")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    failed = 0
    for arch in (int(a) for a in args.arch.split(",")):
        for name, kernel, types, consts, options in _configs(args.all):
            if args.kernels and name.split("[")[0] not in args.kernels.split(","):
                continue
            t0 = time.perf_counter()
            try:
                compile_one(kernel, types, consts, arch, options)
                print(f"ok    sm_{arch} {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
            except Exception as e:  # report every failure, not just the first
                failed += 1
                msg = str(e).strip().splitlines()
                print(f"FAIL  sm_{arch} {name}: {type(e).__name__}: {' | '.join(msg[-6:])}", flush=True)
    print(f"compile_check: {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
