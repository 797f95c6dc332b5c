"""Interpreter/compiler switching for our Triton kernels.

``triton.jit`` decides at decoration time whether a function is compiled or interpreted
(``TRITON_INTERPRET``), so a module imported before the variable was set holds compiled kernels
that cannot run on CPU — and so does Triton's own standard library (``tl.zeros``, ``tl.sum``,
``tl.cdiv`` … are ``@jit`` functions). Every launcher enters :func:`launching` first: it swaps
the module's kernels (and the helpers they call, looked up by global name at run time) for the
twin that matches the environment *now*, and while interpreting also swaps the standard
library's functions, restoring them on exit so nobody else's compiled kernels see them. Twins
are cached, so compiled kernels keep their compile cache.
"""

from __future__ import annotations

import contextlib
import os
import sys

import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_TWINS: dict[tuple[object, bool], object] = {}
_MODE: dict[int, bool] = {}  # id(namespace) -> the mode its functions were last put in


def interpreting() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for the interpreter (read at call time, not import time)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _twin(fn, interpret: bool):
    key = (fn, interpret)
    if key not in _TWINS:
        _TWINS[key] = InterpretedFunction(fn) if interpret else JITFunction(fn)
    return _TWINS[key]


def refresh(namespace: dict, interpret: bool | None = None) -> None:
    """Make every Triton function in ``namespace`` (a module's globals) match the current mode
    (or ``interpret``), and the modules those functions come from (a helper imported from another
    module looks up its own callees in that module's globals)."""
    interpret = interpreting() if interpret is None else interpret
    if _MODE.get(id(namespace)) == interpret:
        return  # the common case: nothing changed since the last launch
    _MODE[id(namespace)] = interpret
    homes = []
    for name, obj in list(namespace.items()):
        if isinstance(obj, (JITFunction, InterpretedFunction)):
            mode = isinstance(obj, InterpretedFunction)
            _TWINS.setdefault((obj.fn, mode), obj)
            if mode != interpret:
                namespace[name] = _twin(obj.fn, interpret)
            if obj.fn.__globals__ is not namespace:
                homes.append(obj.fn.__globals__)
    for home in homes:
        refresh(home, interpret)


@contextlib.contextmanager
def launching(namespace: dict):
    """Launch kernels from ``namespace`` (a module's globals) in the mode the environment asks for."""
    refresh(namespace)
    if not interpreting():
        yield
        return
    saved = _language_attributes()
    swapped = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not (module_name == "triton.language" or module_name.startswith("triton.language.")):
            continue
        for name, obj in list(vars(module).items()):
            if isinstance(obj, JITFunction):
                setattr(module, name, _twin(obj.fn, True))
                swapped.append((module, name, obj))
    try:
        yield
    finally:
        for module, name, obj in swapped:
            setattr(module, name, obj)
        _restore_language_attributes(saved)


def _language_namespaces() -> list:
    import triton.language as tl

    found = [tl, tl.core, tl.math, tl.core.tensor, getattr(tl.core, "tensor_descriptor_base", None)]
    return [ns for ns in found if ns is not None]


def _language_attributes() -> list[tuple[object, dict]]:
    """What the interpreter patches while it runs a kernel (``triton.language`` and its tensor
    types), as it was: the interpreter does not undo the patches its nested device-function calls
    make (Triton 3.9), and a compiled kernel built afterwards in the same process would see them."""
    return [(ns, dict(vars(ns))) for ns in _language_namespaces()]


def _restore_language_attributes(saved: list[tuple[object, dict]]) -> None:
    for ns, attributes in saved:
        for name in set(vars(ns)) - set(attributes):
            delattr(ns, name)
        for name, value in attributes.items():
            if vars(ns).get(name, value) is not value:
                setattr(ns, name, value)


def next_power_of_2(n: int) -> int:
    return triton.next_power_of_2(n)
