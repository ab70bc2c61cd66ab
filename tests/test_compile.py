"""The generated forward and backward kernels compile for a Hopper GPU (sm_90, through cubin) on a
machine without one, catching what the interpreter accepts but the compiler does not (globals that
are not constexpr, loop-carried types, constexpr branches).

Triton cannot compile in a process whose ``triton.language`` was loaded for the interpreter, so
the test runs this file as a script in a child process without ``TRITON_INTERPRET``.
"""

import os
import re
import subprocess
import sys

import pytest

PROGRAMS = [
    "(mul s 0.125)",
    "(where (le k (add q (sub Sk Sq))) (mul s 0.125) -inf)",
    "(where (and (le k q) (gt k (sub q 20.0))) (mul s 0.125) -inf)",
    "(where $0 (mul s 0.125) -inf)",
    "(add (mul s 0.125) $0)",
    "(where (le k q) (mul s 0.125) (add (mul s 0.125) -3.4028234663852886e+38))",
]
POINTERS = {"Q", "K", "V", "O", "LSE", "DO", "DELTA", "LOG2N", "DQ", "DK", "DV"}


def compile_for_hopper(kernel, dtype: str, operand: str, constexprs: dict, num_warps: int, num_stages: int,
                       descriptors: dict[str, tuple[int, int]] | None = None):
    """Compile ``kernel`` to a cubin; ``descriptors`` gives the TMA block ``(rows, width)`` of each
    argument passed as a tensor descriptor."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def kind(arg: str) -> str:
        if arg in constexprs:
            return "constexpr"
        if descriptors and arg in descriptors:
            return f"tensordesc<{dtype}[1,1,{descriptors[arg][0]},{descriptors[arg][1]}]>"
        if arg in ("LSE", "DELTA", "LOG2N"):
            return "*fp32"
        if arg in POINTERS:
            return f"*{dtype}"
        return f"*{operand}" if arg.startswith("T") and arg[1:].isdigit() else "i32"

    source = ASTSource(fn=kernel, signature={arg: kind(arg) for arg in kernel.arg_names}, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    assert compiled.asm["cubin"]
    return compiled


def compile_all() -> None:
    """Compile every kernel of every program in :data:`PROGRAMS` for fp16 inputs, head dim 64."""
    from attncompiler.codegen.flash import load_kernel
    from attncompiler.codegen.flash_bwd import load_kernels

    for program in PROGRAMS:
        operand = "i1" if program.startswith("(where $0") else "fp16"
        shapes = dict(HEAD_D=64, HEAD_DV=64, BLOCK_D=64, BLOCK_DV=64, DOT_PRECISION="tf32")
        head = dict(shapes, ZERO_EMPTY_ROWS=False)
        backward = load_kernels(program)
        for kernel, constexprs, warps, stages in (
            (load_kernel(program)[1], {**head, "BLOCK_M": 64, "BLOCK_N": 32}, 4, 2),
            (backward.preprocess, {**shapes, "BLOCK_M": 64, "BLOCK_N": 16}, 4, 2),
            (backward.dkdv, {**head, "BLOCK_M": 16, "BLOCK_N": 64}, 4, 2),
            (backward.dq, {**head, "BLOCK_M": 64, "BLOCK_N": 16}, 4, 2),
        ):
            try:
                compile_for_hopper(kernel, "fp16", operand, constexprs, warps, stages)
            except Exception as e:
                raise AssertionError(f"{kernel.__name__} of {program} does not compile: {e}") from e
        for head_dim, block_m, block_n, warps, stages in ((64, 128, 64, 8, 3), (128, 64, 64, 4, 3), (256, 64, 32, 4, 2)):
            tiles = dict(HEAD_D=head_dim, HEAD_DV=head_dim, BLOCK_D=head_dim, BLOCK_DV=head_dim,
                         BLOCK_M=block_m, BLOCK_N=block_n, DOT_PRECISION="tf32", ZERO_EMPTY_ROWS=False)
            blocks = {"Q": (block_m, head_dim), "K": (block_n, head_dim), "V": (block_n, head_dim),
                      "O": (block_m, head_dim)}
            try:
                compile_for_hopper(load_kernel(program, tma=True)[1], "bf16", operand, tiles, warps, stages, blocks)
            except Exception as e:
                raise AssertionError(f"the TMA forward of {program} does not compile at D{head_dim}: {e}") from e
        # At the default fp16 tiles, dK and dV take P and dS as computed: transposing a product's
        # result into a wgmma operand is miscompiled on sm_90 by some Triton releases.
        dkdv = compile_for_hopper(backward.dkdv, "fp16", operand, {**head, "BLOCK_M": 32, "BLOCK_N": 128}, 8, 3)
        transposed = re.findall(r"tt\.trans .*: tensor<[^>]*#mma\d*>", dkdv.asm["ttgir"])
        assert not transposed, f"dkdv of {program} transposes a product: {transposed[0]}"


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-4000:]


if __name__ == "__main__":
    compile_all()
