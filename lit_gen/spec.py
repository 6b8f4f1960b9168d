"""Self-describing objects: record a class's constructor arguments so it can be rebuilt from plain data.

Checkpoints and exported files carry ``{"class_path": ..., "init_args": {...}}`` for the network and the
parameterisation, so loading needs only the file. ``build`` imports only from ``lit_gen.`` (and modules the caller
allows explicitly): a checkpoint can name a class, but never make us import arbitrary code.

This is a leaf module (it imports nothing of ours), so ``nets/`` and ``diffusion/`` may use it without reaching up.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

ALLOWED_PREFIXES: tuple[str, ...] = ("lit_gen.",)


def _plain(value: Any) -> Any:
    """Convert tuples/lists/dicts of JSON-able scalars to plain JSON types (tuples become lists)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"constructor argument {value!r} of type {type(value).__name__} is not plain data")


class Configurable:
    """Mixin: records the arguments of the most-derived ``__init__`` in ``self.init_args`` (plain JSON data).

    Subclasses need no boilerplate; ``describe(obj)`` then returns the spec that ``build`` turns back into an
    equal object. Arguments named in a class's ``omit_when_default`` are recorded only when they differ from their
    default (options added after files were written keep those files' specs unchanged).
    Arguments must be plain data (numbers, strings, bools, None, lists/tuples/dicts of those).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" not in cls.__dict__:
            return
        original = cls.__dict__["__init__"]
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(self, *args: Any, **kw: Any) -> None:
            if not hasattr(self, "_lit_gen_recording"):
                object.__setattr__(self, "_lit_gen_recording", True)
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                recorded = {k: _plain(v) for k, v in list(bound.arguments.items())[1:]}
                for name in getattr(cls, "omit_when_default", ()):
                    # an argument added later (a net's second time input) stays out of the spec while it is off,
                    # so the files written before it describe the same object as before
                    if name in recorded and recorded[name] == signature.parameters[name].default:
                        del recorded[name]
                original(self, *args, **kw)
                object.__setattr__(self, "init_args", recorded)
            else:
                original(self, *args, **kw)

        cls.__init__ = __init__  # type: ignore[method-assign]


def class_path(obj_or_cls: Any) -> str:
    cls = obj_or_cls if isinstance(obj_or_cls, type) else type(obj_or_cls)
    # FSDP2's fully_shard swaps in a subclass made on the fly (FSDP<Name> in torch.distributed.fsdp): name the class.
    cls = next((c for c in cls.__mro__ if not c.__module__.startswith("torch.distributed.fsdp")), cls)
    return f"{cls.__module__}.{cls.__qualname__}"


def describe(obj: Any) -> dict[str, Any]:
    """The spec ``{"class_path", "init_args"}`` of a ``Configurable`` object."""
    init_args = getattr(obj, "init_args", None)
    if init_args is None:
        raise TypeError(
            f"{class_path(obj)} does not record its constructor arguments (inherit lit_gen.spec.Configurable)"
        )
    return {"class_path": class_path(obj), "init_args": dict(init_args)}


def resolve(path: str, allowed: tuple[str, ...] = ALLOWED_PREFIXES) -> type:
    """Import a class by dotted path, only from allowed module prefixes."""
    if not any(path.startswith(p) for p in allowed):
        raise ValueError(f"refusing to import {path!r}: only classes under {', '.join(allowed)} may be named in a file")
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot find class {path!r} named in the file: {err}") from None


def build(spec: dict[str, Any], allowed: tuple[str, ...] = ALLOWED_PREFIXES) -> Any:
    """Rebuild an object from ``describe``'s spec."""
    try:
        path, init_args = spec["class_path"], spec.get("init_args", {})
    except (KeyError, TypeError):
        raise ValueError(f"not a class spec: {spec!r}") from None
    return resolve(path, allowed)(**init_args)
