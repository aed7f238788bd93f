"""Compile the signal kernels for an NVIDIA target without a GPU (a check, not a runtime path).

Triton's interpreter runs the kernels on CPU tensors, but it accepts things the GPU compiler
rejects (and the other way round). Triton's wheel ships ``ptxas`` and ``cuobjdump``, so the real
compiler can run on a machine with no GPU: this module builds each kernel exactly as
:func:`.triton_gpu._plan` would launch it for a shape and dtype, compiles it to a cubin for the
given architecture (sm_90 = H100 / H200 by default) and reads back its register and stack use.

It must run in a process where ``TRITON_INTERPRET`` is unset (``@triton.jit`` reads it when the
kernels are defined), hence the command line::

    python -m hitl_triage.kernels.signals.triton_offline 4096x5x10:float16 9x2x4097:float64:index

prints one line per case and exits non-zero when a case fails to compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import subprocess
import sys
import tempfile

import torch

logger = logging.getLogger(__name__)

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}
_OUTPUTS = ("pred_ptr", "conf_ptr", "margin_ptr", "total_ptr", "expected_ptr", "mi_ptr", "vote_ptr", "valid_ptr")


@dataclasses.dataclass(frozen=True)
class CompiledCase:
    """What the compiler made of one (shape, dtype, index) case."""

    label: str
    kernel: str
    block_r: int
    block_c: int
    block_m: int
    num_warps: int
    align: int
    registers: int  # per thread, as ptxas allocated them
    stack_bytes: int  # > 0 means spills to local memory


def compile_case(shape: tuple[int, int, int], dtype: torch.dtype, has_index: bool,
                 arch: int = 90) -> CompiledCase:
    """Compile the kernel :func:`_plan` picks for logits ``shape`` / ``dtype`` to a cubin."""
    plan, name, compiled = compile_kernel(shape, dtype, has_index, arch)
    registers, stack = _resource_usage(compiled.asm["cubin"])
    label = f"{'x'.join(map(str, shape))}:{str(dtype).removeprefix('torch.')}{':index' if has_index else ''}"
    return CompiledCase(label, name, plan.block_r, plan.block_c, plan.block_m, plan.num_warps,
                        plan.align, registers, stack)


def compile_kernel(shape: tuple[int, int, int], dtype: torch.dtype, has_index: bool, arch: int = 90):
    """(plan, kernel name, Triton's compiled kernel with its ``asm`` dict: ttgir, ptx, cubin)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET: expected unset for an offline compile, found it set")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_gpu

    batch, members, classes = shape
    plan = triton_gpu._plan(batch, members, classes)
    fn = triton_gpu._signals_tiled_kernel if plan.tiled else triton_gpu._signals_fused_kernel
    # As a launch specialises them: pointers from torch's allocator are 16-byte aligned, integers
    # divisible by 16 are marked so, and integers equal to 1 become constants.
    pointers = {"logits_ptr": f"*{_TRITON_DTYPES[dtype]}", "temps_ptr": "*fp32", "index_ptr": "*i32"}
    pointers.update({name: "*fp32" for name in _OUTPUTS})
    pointers["pred_ptr"], pointers["valid_ptr"] = "*i32", "*i1"
    integers = {"n_rows": batch, "n_members": members, "n_classes": classes,
                "stride_row": members * classes, "stride_member": classes}
    signature = dict(pointers)
    signature.update({name: "i32" for name in integers})
    constants = {"HAS_INDEX": has_index, "IS_FP64": dtype == torch.float64,
                 "BLOCK_R": plan.block_r, "BLOCK_C": plan.block_c, "ALIGN": plan.align}
    if plan.tiled:
        constants["BLOCK_M"] = plan.block_m
    constants.update({name: 1 for name, value in integers.items() if value == 1})
    signature.update({name: "constexpr" for name in constants})
    aligned = [name for name in pointers] + [n for n, v in integers.items() if v % 16 == 0]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": plan.num_warps})
    return plan, fn.__name__, compiled


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) of the one kernel in ``cubin``, from Triton's bundled cuobjdump."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", f.name],
                                capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+)\s+STACK:(\d+)", report)
    if found is None:
        raise RuntimeError(f"cuobjdump: expected a REG: / STACK: line, found {report!r}")
    return int(found.group(1)), int(found.group(2))


def _parse_case(text: str) -> tuple[tuple[int, int, int], torch.dtype, bool]:
    parts = text.split(":")
    shape = tuple(int(n) for n in parts[0].split("x"))
    if len(shape) != 3 or len(parts) < 2:
        raise ValueError(f"case: expected BxMxC:dtype[:index], found {text!r}")
    dtype = getattr(torch, parts[1], None)
    if dtype not in _TRITON_DTYPES:
        raise ValueError(f"case {text!r}: expected dtype float16, bfloat16, float32 or float64, found {parts[1]!r}")
    return shape, dtype, parts[2:] == ["index"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="BxMxC:dtype[:index], e.g. 4096x5x10:float16")
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    args = parser.parse_args(argv)
    failed = 0
    for text in args.cases:
        shape, dtype, has_index = _parse_case(text)
        try:
            case = compile_case(shape, dtype, has_index, args.arch)
        except Exception as exc:  # noqa: BLE001 - reported per case, the exit status says it failed
            failed += 1
            sys.stdout.write(f"FAIL {text}: {type(exc).__name__}: {exc}\n")
            continue
        sys.stdout.write(
            f"ok {case.label} {case.kernel} BLOCK_R={case.block_r} BLOCK_C={case.block_c} "
            f"BLOCK_M={case.block_m} ALIGN={case.align} warps={case.num_warps} registers={case.registers} "
            f"stack={case.stack_bytes}\n"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
