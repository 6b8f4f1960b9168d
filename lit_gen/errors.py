"""The one exception type users see as a one-line message (the CLI prints it without a traceback)."""

from __future__ import annotations

_RAISED: list[str] = []


class LitGenError(ValueError):
    """Bad input a user can fix: missing shards, unreadable checkpoint, mismatched teacher, bad recipe value.

    Libraries in between (jsonargparse instantiating a recipe's classes) sometimes re-wrap exceptions in their own
    multi-line errors; every message is remembered so the CLI can still print just this sentence.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        _RAISED.append(message)
        del _RAISED[:-16]


def find_user_error(err: BaseException) -> str | None:
    """The message of a LitGenError raised during this process that ``err`` (or its cause chain) mentions."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, LitGenError):
            return str(seen)
        text = str(seen)
        for message in reversed(_RAISED):
            if message and message in text:
                return message
        seen = seen.__cause__ or seen.__context__
    return None


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when the message is empty)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _torch_reason(err: BaseException) -> str:
    """The specific line of torch's multi-line weights-only error (its boilerplate paragraphs dropped)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(_TORCH_BOILERPLATE)]
    return (specific[0] if specific else first_line(err))[:200]


def _pickled_imports(source) -> list[str]:  # type: ignore[no-untyped-def]
    """The ``module.name`` globals a pickle (plain, or a torch zip's ``data.pkl``) would import; never unpickles.

    Walks the opcodes with :mod:`pickletools` (a disassembler, it executes nothing). Empty when the bytes are not a
    complete pickle, so random or truncated bytes are reported as unreadable rather than as hostile.
    """
    import io
    import pickletools
    import zipfile

    opened = None
    try:
        if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
            source = opened = open(source, "rb")  # noqa: SIM115 - closed in finally
        source.seek(0)
        if zipfile.is_zipfile(source):
            archive = zipfile.ZipFile(source)
            name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            stream = archive.open(name) if name else io.BytesIO()
        else:
            source.seek(0)
            stream = source
        imports: list[str] = []
        strings: list[str] = []
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name in ("GLOBAL", "INST"):
                imports.append(str(arg).replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                imports.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
        return imports
    except Exception:  # noqa: BLE001 - not a complete pickle: nothing to name
        return []
    finally:
        if opened is not None:
            opened.close()


def _global_name(entry) -> str:  # type: ignore[no-untyped-def]
    """``module.name`` of an entry of ``torch.serialization.get_safe_globals()`` (an object or (object, name))."""
    if isinstance(entry, tuple):
        return str(entry[1])
    return f"{getattr(entry, '__module__', '')}.{getattr(entry, '__qualname__', '')}"


_PLAIN_SAFE_GLOBALS = frozenset({"collections.OrderedDict", "builtins.set", "builtins.frozenset", "_codecs.encode"})


def load_torch_file(source, what: str, **kwargs):  # type: ignore[no-untyped-def]
    """``torch.load(source, weights_only=True, **kwargs)`` with every failure turned into one LitGenError line.

    ``what`` names the file in the message ("checkpoint runs/x/last.ckpt"). Random or damaged bytes make torch's
    weights-only unpickler fail in many ways (IndexError, KeyError, UnicodeDecodeError, UnpicklingError, ...), so
    any ``Exception`` counts as unreadable; a pickle that would import code (a global outside torch's allow-list,
    seen by torch or by disassembling the opcodes) is refused and named as such.
    """
    import torch

    kwargs["weights_only"] = True
    kwargs.setdefault("map_location", "cpu")
    try:
        # torch.serialization.load is torch.load; called by this name so that it is the original even while
        # scale.checkpoints routes DeepSpeed's own `torch.load` calls through here.
        return torch.serialization.load(source, **kwargs)
    except Exception as err:  # noqa: BLE001 - see the docstring: damaged bytes fail in arbitrary ways
        reason = _torch_reason(err)
        allowed = _PLAIN_SAFE_GLOBALS | {_global_name(g) for g in torch.serialization.get_safe_globals()}
        imports = _pickled_imports(source)
        foreign = [name for name in imports if name not in allowed and not name.startswith("torch.")]
        if "GLOBAL" in reason or foreign:
            named = f"imports {foreign[0]}" if foreign else reason
            raise LitGenError(
                f"refusing to load {what}: it holds objects that would run code when unpickled ({named})"
            ) from None
        raise LitGenError(
            f"cannot read {what} (truncated or not a torch file?): {type(err).__name__}: {reason}"
        ) from None


def load_restricted_pickle(source, what: str, allowed: dict):  # type: ignore[no-untyped-def]
    """Unpickle ``source`` (a path) with a restricted unpickler: every global the pickle names must be a key of
    ``allowed`` (``"module.name" -> the inert object to use instead``), anything else is refused in one line that
    names it. Nothing the pickle names is imported and no code from the file runs: the pickle can only call the
    callables of ``allowed`` (which the caller chooses to be data constructors), persistent ids are refused.

    For pickles that are not torch files (NVlabs's ``network-snapshot-*.pkl`` written by ``pickle.dump``);
    ``load_torch_file`` is the reader for torch files.
    """
    import pickle

    class _Refused(pickle.UnpicklingError):
        pass

    class _Restricted(pickle.Unpickler):
        def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
            key = f"{module}.{name}"
            if key not in allowed:
                raise _Refused(key)
            return allowed[key]

        def persistent_load(self, pid):  # type: ignore[no-untyped-def]
            raise _Refused(f"persistent id {str(pid)[:60]!r}")

    try:
        with open(source, "rb") as handle:
            return _Restricted(handle).load()
    except _Refused as err:
        raise LitGenError(
            f"refusing to load {what}: it asks for {err} when unpickled, which is outside the allowed set "
            "(only tensors, plain containers and inert records are rebuilt)"
        ) from None
    except LitGenError:
        raise
    except FileNotFoundError:
        raise LitGenError(f"{what} does not exist") from None
    except Exception as err:  # noqa: BLE001 - damaged bytes fail in arbitrary ways
        raise LitGenError(
            f"cannot read {what} (truncated or not a pickle?): {type(err).__name__}: {first_line(err)}"
        ) from None
