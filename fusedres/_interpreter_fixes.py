"""Make the Triton interpreter compute bf16 the way the GPU does.

Two defects of the interpreter (seen in triton 3.8) would make every bf16 check on a CPU
machine measure the interpreter instead of our kernels:

- ``tl.dot`` on bf16 operands multiplies the raw 16-bit patterns as integers;
- an fp32 -> bf16 cast truncates, where the GPU rounds to nearest even.

:func:`apply` patches the interpreter's builder for exactly these two cases (bf16 products
are exact in fp32, so widening before the product is what the tensor cores compute). It is
called only when the interpreter is on, and does nothing where the builder looks different.

It also turns off the interpreter's integer-overflow sanitizer, which does nothing there but
cost time: the interpreter's options hold ``debug=False`` (nothing sets it), so every 32-bit
``+ - *`` computed its operands again in int64 and compared the result with the int32 range
for a ``device_assert`` that is a no-op without ``debug`` (``semantic.device_assert``) — about a
quarter of an interpreted kernel's time in a profile of a block's training step (triton 3.8).
The results are the same bits either way; with ``debug`` on, the sanitizer is left on.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def _bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def _f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    out = rounded.astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), out)


def apply() -> bool:
    """Patch the interpreter; returns False when its builder is not the one these fixes know."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    builder = getattr(interpreter, "InterpreterBuilder", None)
    handle = getattr(interpreter, "TensorHandle", None)
    if builder is None or handle is None or getattr(builder, "_fusedres_patched", False):
        return False
    if not all(hasattr(builder, name) for name in ("cast_impl", "create_dot")):
        return False
    orig_cast = builder.cast_impl
    orig_dot = builder.create_dot

    def cast_impl(self, src, dst_type):  # noqa: ANN001, ANN202 - the interpreter's signature
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return handle(_f32_to_bf16_bits(src.data), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    def widen(t):  # noqa: ANN001, ANN202
        return handle(_bf16_bits_to_f32(t.data), tl.float32) if t.dtype.scalar == tl.bfloat16 else t

    def create_dot(self, a, b, d, *args, **kwargs):  # noqa: ANN001, ANN202
        return orig_dot(self, widen(a), widen(b), d, *args, **kwargs)

    builder.cast_impl = cast_impl
    builder.create_dot = create_dot
    builder._fusedres_patched = True
    _sanitizer_off(getattr(interpreter, "interpreter_builder", None))
    return True


def _sanitizer_off(instance: object) -> None:
    """``sanitize_overflow=False`` on the interpreter's builder where its checks could never fire
    (``debug`` off); nothing where the options look different."""
    options = getattr(instance, "options", None)
    if (dataclasses.is_dataclass(options) and getattr(options, "sanitize_overflow", False)
            and getattr(options, "debug", True) is False):
        instance.options = dataclasses.replace(options, sanitize_overflow=False)
