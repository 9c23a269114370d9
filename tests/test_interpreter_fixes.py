"""fusedres._interpreter_fixes: the integer-overflow sanitizer is turned off only where it could
never fire (the interpreter's ``debug`` off), and the builder of this run has it off."""

from __future__ import annotations

import dataclasses

import pytest

from fusedres import _interpreter_fixes, _runtime


@dataclasses.dataclass(frozen=True)
class _Options:
    debug: bool = False
    sanitize_overflow: bool = True


class _Builder:
    def __init__(self, options: object) -> None:
        self.options = options


@pytest.mark.parametrize(("options", "sanitize"), [
    (_Options(), False),  # its device_assert is a no-op without debug: off
    (_Options(debug=True), True),  # with debug the check asserts: left on
    (_Options(sanitize_overflow=False), False),
])
def test_sanitizer_off_only_without_debug(options: _Options, sanitize: bool) -> None:
    builder = _Builder(options)
    _interpreter_fixes._sanitizer_off(builder)
    assert builder.options.sanitize_overflow is sanitize
    assert builder.options.debug is options.debug


def test_unknown_options_left_alone() -> None:
    builder = _Builder({"debug": False, "sanitize_overflow": True})
    _interpreter_fixes._sanitizer_off(builder)
    assert builder.options == {"debug": False, "sanitize_overflow": True}
    _interpreter_fixes._sanitizer_off(object())  # no options at all: nothing to do


@pytest.mark.skipif(not _runtime.INTERPRET, reason="the interpreter's builder exists only when it is on")
def test_interpreter_builder_has_it_off() -> None:
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    assert options.debug is False and options.sanitize_overflow is False
