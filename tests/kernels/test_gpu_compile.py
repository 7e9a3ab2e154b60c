"""Every Triton kernel, in every constexpr variant the ops launch, compiles for a real GPU (sm_90 cubin via
the bundled ptxas) — no GPU needed. The interpreter accepts code the compiler rejects (plain Python float
globals, for one), so this is the CPU suite's check that the kernels run on CUDA at all.

Runs in a subprocess: this test session imports triton in interpreter mode (see conftest.py), and the
compiler needs the kernels decorated in compiled mode. Run this file as a script to see register / spill
figures: `python tests/kernels/test_gpu_compile.py`."""

import os
import subprocess
import sys

NORM_FORWARD_TYPES = dict(X="*bf16", RESIDUAL="*fp32", X_BIAS="*bf16", H_OUT="*fp32", Y="*bf16", WEIGHT="*fp32",
                          NORM_BIAS="*fp32", MEAN="*fp32", RSTD="*fp32", n_cols="i32", eps="fp32",
                          dropout_p="fp32", seed="i32")
NORM_BACKWARD_TYPES = dict(DY="*bf16", DH_OUT="*fp32", H="*fp32", WEIGHT="*fp32", MEAN="*fp32", RSTD="*fp32",
                           DH="*fp32", DX="*bf16", DWEIGHT_PARTIAL="*fp32", DNORM_BIAS_PARTIAL="*fp32",
                           DX_BIAS_PARTIAL="*fp32", n_rows="i32", n_cols="i32", rows_per_program="i32",
                           dropout_p="fp32", seed="i32")


def _variants():
    from scaletrain.kernels import triton_cross_entropy as ce
    from scaletrain.kernels import triton_gelu as gelu
    from scaletrain.kernels import triton_norm as norm

    for block_n in (1024, 16384):  # GPT-2 small and GPT-3 175B widths
        warps = min(max(block_n // 256, 4), 32)  # as triton_norm._row_block picks
        for is_rms, fused in ((False, False), (True, False), (False, True), (True, True)):
            yield norm._norm_forward_kernel, NORM_FORWARD_TYPES, dict(
                IS_RMS=is_rms, HAS_RESIDUAL=fused, HAS_X_BIAS=fused, HAS_DROPOUT=fused, STORE_H=fused,
                HAS_NORM_BIAS=not is_rms, BLOCK_N=block_n), warps
            yield norm._norm_backward_kernel, NORM_BACKWARD_TYPES, dict(
                IS_RMS=is_rms, HAS_DH_OUT=fused, STORE_DH=fused, HAS_DROPOUT=fused, HAS_NORM_BIAS=not is_rms,
                HAS_X_BIAS=fused, BLOCK_N=block_n), warps
    for approx_tanh in (False, True):
        yield gelu._bias_gelu_forward_kernel, dict(X="*bf16", BIAS="*bf16", Y="*bf16", n_elements="i32",
                                                   n_cols="i32"), dict(HAS_BIAS=True, APPROX_TANH=approx_tanh,
                                                                       BLOCK=gelu._ELEMENTWISE_BLOCK), 4
        yield gelu._bias_gelu_backward_kernel, dict(
            X="*bf16", BIAS="*bf16", DY="*bf16", DX="*bf16", DBIAS_PARTIAL="*fp32", n_rows="i32", n_cols="i32",
            rows_per_program="i32"), dict(HAS_BIAS=True, APPROX_TANH=approx_tanh, BLOCK_M=gelu._TILE_M,
                                          BLOCK_N=gelu._TILE_N), 8
    yield gelu._gated_gelu_forward_kernel, dict(GATE="*bf16", UP="*bf16", Y="*bf16", n_elements="i32"), dict(
        BLOCK=gelu._ELEMENTWISE_BLOCK), 4
    yield gelu._gated_gelu_backward_kernel, dict(GATE="*bf16", UP="*bf16", DY="*bf16", DGATE="*bf16",
                                                 DUP="*bf16", n_elements="i32"), dict(BLOCK=gelu._ELEMENTWISE_BLOCK), 4
    for need_logit_sum in (False, True):
        yield ce._row_stats_kernel, dict(LOGITS="*bf16", LABELS="*i64", STATS="*fp32", n_rows="i32", n_cols="i32",
                                         vocab_start="i32"), dict(NEED_LOGIT_SUM=need_logit_sum,
                                                                  BLOCK_V=ce._CUDA_BLOCK_V), 8
    yield ce._logits_grad_kernel, dict(LOGITS="*bf16", LABELS="*i64", LSE="*fp32", ROW_SCALE="*fp32", GRAD="*bf16",
                                       n_cols="i32", vocab_start="i32", smoothing_per_class="fp32",
                                       target_weight="fp32"), dict(BLOCK_V=ce._CUDA_BLOCK_V), 8


def _resource_usage(cubin: bytes) -> str:
    import tempfile

    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage = subprocess.run([cuobjdump, "-res-usage", handle.name], capture_output=True, text=True).stdout
    return " ".join(line.split("SHARED")[0].strip() for line in usage.splitlines() if "REG:" in line)


def compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    for kernel, types, constexprs, num_warps in _variants():
        signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                  options={"num_warps": num_warps})
        flags = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())
        print(f"{kernel.__name__}[{flags}] warps={num_warps}: {_resource_usage(compiled.asm['cubin'])}")


def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("REG:") == sum(1 for _ in _variants()), result.stdout  # one cubin per variant


if __name__ == "__main__":
    compile_all()
