"""A symbolic pickle machine: follows every opcode (pickletools' table), executes none of them.

It keeps a stack and memo of symbols instead of objects, which is what lets it answer the
questions a flat list of GLOBAL opcodes cannot:

- what a STACK_GLOBAL imports, when its module and name come from earlier string opcodes,
  directly or through MEMOIZE/PUT and GET (an operand it cannot resolve is dangerous);
- that REDUCE, NEWOBJ and OBJ only ever call an imported global (calling a value computed at
  load time, e.g. the result of another call, is dangerous), and that BUILD/APPEND/SETITEM
  never mutate an imported module-level object;
- how many raw bytes joblib wrote after a `NumpyArrayWrapper`, so uncompressed joblib files
  with inline arrays are read to their end instead of failing at the first array.

Every global that `pickle_allowlist` does not allow is a "dangerous" finding.
"""

from __future__ import annotations

import math
import pickletools
import re
from dataclasses import dataclass, field
from typing import IO, Any

from converge.control.library.inspection.pickle_stream import ShadowBudget, StreamReader, iter_opcodes
from converge.control.library.inspection.results import Finding
from converge.core import pickle_allowlist

# Literal containers are tracked element by element up to this size (shapes, dtype states).
TRACKED_ITEMS = 1024
JOBLIB_WRAPPER = "joblib.numpy_pickle.NumpyArrayWrapper"
_LITERALS = frozenset(
    "INT BININT BININT1 BININT2 LONG LONG1 LONG4 STRING BINSTRING SHORT_BINSTRING BINBYTES "
    "SHORT_BINBYTES BINBYTES8 BYTEARRAY8 UNICODE SHORT_BINUNICODE BINUNICODE BINUNICODE8 FLOAT "
    "BINFLOAT".split()
)
_CONSTANTS = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}
_EMPTY = {"EMPTY_LIST": list, "EMPTY_DICT": dict, "EMPTY_TUPLE": tuple, "EMPTY_SET": list}


class PickleParseError(ValueError):
    """The bytes are not a pickle a loader could read to its end."""


@dataclass(eq=False)
class Sym:
    """One stack value: a literal, an imported global, an object built by a call, or unknown."""

    kind: str  # "lit" | "global" | "obj" | "mark" | "opaque"
    value: Any = None  # literals: the value, containers holding unwrapped items
    name: str | None = None  # globals: "module.name"; objects: what built them
    args: Any = None  # objects: the arguments of the call that built them
    state: Any = None  # objects: what BUILD gave them


_MARK = Sym("mark")


def _unwrap(sym: Sym) -> Any:
    return sym.value if sym.kind == "lit" else sym


@dataclass
class PickleReport:
    findings: list[Finding] = field(default_factory=list)
    opcodes: int = 0
    active: bool = False  # imported or called something: loading it runs code paths
    value: Any = None  # the pickled value, when it is a literal (torch's legacy magic number)
    error: str | None = None
    end: int = 0  # stream offset after STOP


class PickleMachine:
    """Runs one pickle (up to STOP) symbolically.

    `tolerant`: a shadow parse that starts mid-stream with an unknown stack; it never fails
    and only reports imports. `follow_joblib`: read joblib's inline arrays as joblib.load does.
    """

    def __init__(
        self,
        reader: StreamReader,
        *,
        label: str,
        tolerant: bool = False,
        follow_joblib: bool = True,
        budget: ShadowBudget | None = None,
    ) -> None:
        self.reader, self.label, self.tolerant = reader, label, tolerant
        self.follow_joblib = follow_joblib and not tolerant
        self.budget = budget or ShadowBudget()
        self.stack: list[Sym] = []
        self.memo: dict[int, Sym] = {}
        self.report = PickleReport()
        self._seen: set[tuple[str | None, str]] = set()

    # -- findings ------------------------------------------------------------------------------

    def dangerous(self, global_name: str | None, message: str, *, is_import: bool = False) -> None:
        if (global_name, message) in self._seen or (self.tolerant and not is_import):
            return
        self._seen.add((global_name, message))
        finding = Finding(file=self.label, global_name=global_name, severity="dangerous", message=message)
        self.report.findings.append(finding)

    def run(self, *, max_opcodes: int | None = None) -> PickleReport:
        try:
            for opcode, arg in iter_opcodes(self.reader):
                self.report.opcodes += 1
                skipped, self.reader.skipped = self.reader.skipped, False
                if opcode.name == "STOP":
                    top = self.pop()
                    self.report.value = top.value if top.kind == "lit" else None
                    break
                self.step(opcode, arg, skipped=skipped)
                if max_opcodes is not None and self.report.opcodes >= max_opcodes:
                    break
                if self.tolerant:
                    self.budget.shadow_opcodes -= 1
                    if self.budget.shadow_opcodes <= 0:
                        break
        except Exception as exc:  # genops' ValueErrors, and anything odd bytes provoke: fail closed
            self.report.error = f"{exc}" or type(exc).__name__
        self.report.end = self.reader.tell()
        return self.report

    # -- the stack -----------------------------------------------------------------------------

    def pop(self) -> Sym:
        if not self.stack or self.stack[-1] is _MARK:
            if self.tolerant:
                return Sym("opaque")
            raise PickleParseError("stack underflow")
        return self.stack.pop()

    def pop_mark(self) -> list[Sym]:
        for index in range(len(self.stack) - 1, -1, -1):
            if self.stack[index] is _MARK:
                items = self.stack[index + 1 :]
                del self.stack[index:]
                return items
        if self.tolerant:
            items, self.stack = self.stack, []
            return items
        raise PickleParseError("no MARK on the stack")

    def top(self) -> Sym:
        if not self.stack or self.stack[-1] is _MARK:
            if not self.tolerant:
                raise PickleParseError("stack underflow")
            self.stack.append(Sym("opaque"))
        return self.stack[-1]

    # -- opcodes -------------------------------------------------------------------------------

    def step(self, opcode: pickletools.OpcodeInfo, arg: Any, *, skipped: bool) -> None:
        name = opcode.name
        if name in _LITERALS:
            self.stack.append(Sym("opaque") if skipped else Sym("lit", value=arg))
        elif name in _CONSTANTS:
            self.stack.append(Sym("lit", value=_CONSTANTS[name]))
        elif name in _EMPTY:
            self.stack.append(Sym("lit", value=_EMPTY[name]()))
        elif name in ("PROTO", "FRAME", "READONLY_BUFFER"):
            return
        elif name == "MARK":
            self.stack.append(_MARK)
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            self.memo[int(arg)] = self.top()
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self.top()
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            self._get(int(arg))
        elif name in ("GLOBAL", "INST"):
            module, attribute = arg
            if name == "INST":
                self.pop_mark()
            self._import(module, attribute)
            if name == "INST":
                self._call(self.stack.pop(), via="INST")
        elif name == "STACK_GLOBAL":
            self._stack_global()
        else:
            self._structural(name, arg)

    def _get(self, key: int) -> None:
        if key in self.memo:
            self.stack.append(self.memo[key])
        elif self.tolerant:
            self.stack.append(Sym("opaque"))
        else:
            raise PickleParseError(f"memo key {key} is read before it is written")

    def _import(self, module: str, attribute: str) -> None:
        full = f"{module}.{attribute}"
        if all(part.isidentifier() for part in f"{module}.{attribute}".split(".")):
            self.report.active = True  # the import alone runs the module's top-level code
        reason = pickle_allowlist.denial(module, attribute)
        if reason is None and not self.tolerant:
            reason = pickle_allowlist.definition_problem(module, attribute)
        if reason is not None:
            self.dangerous(full, f"imports {reason}; unpickling it can run arbitrary code", is_import=True)
        self.stack.append(Sym("global", name=full))

    def _stack_global(self) -> None:
        attribute, module = self.pop(), self.pop()
        if self.tolerant and "opaque" in (attribute.kind, module.kind):
            self.stack.append(Sym("opaque"))
            return
        if not (
            attribute.kind == module.kind == "lit"
            and isinstance(attribute.value, str)
            and isinstance(module.value, str)
        ):
            self.report.active = True
            self.dangerous(
                None, "STACK_GLOBAL imports a name that cannot be resolved without running the pickle"
            )
            self.stack.append(Sym("global", name=None))
            return
        self._import(module.value, attribute.value)

    def _call(self, func: Sym, *, via: str, args: Any = None) -> None:
        if func.kind != "global":
            if not (self.tolerant and func.kind == "opaque"):
                self.dangerous(None, f"{via} calls a value computed while unpickling, not an imported global")
            self.stack.append(Sym("opaque"))
            return
        self.report.active = True
        built = func.name
        if func.name == "copyreg._reconstructor" and isinstance(args, tuple) and args:
            built = args[0].name if isinstance(args[0], Sym) else None
        self.stack.append(Sym("obj", name=built, args=args))

    def _structural(self, name: str, arg: Any) -> None:
        if name == "REDUCE":
            args = self.pop()
            self._call(self.pop(), via="REDUCE", args=_unwrap(args))
        elif name in ("NEWOBJ", "NEWOBJ_EX"):
            if name == "NEWOBJ_EX":
                self.pop()
            self.pop()
            self._call(self.pop(), via=name)
        elif name == "OBJ":
            items = self.pop_mark()
            self._call(items[0] if items else Sym("opaque"), via="OBJ")
        elif name == "BUILD":
            self._build(self.pop())
        elif name in ("APPEND", "SETITEM", "APPENDS", "SETITEMS", "ADDITEMS"):
            self._add_items(name)
        elif name in ("LIST", "TUPLE", "DICT", "FROZENSET"):
            self._collection(name, self.pop_mark())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            items = [self.pop() for _ in range(int(name[-1]))][::-1]
            self.stack.append(_literal(tuple(_unwrap(item) for item in items)))
        elif name == "POP":
            if self.stack and self.stack[-1] is _MARK:
                self.stack.pop()
            else:
                self.pop()
        elif name == "POP_MARK":
            self.pop_mark()
        elif name == "DUP":
            self.stack.append(self.top())
        elif name in ("PERSID", "BINPERSID"):
            if name == "BINPERSID":
                self.pop()
            self.report.active = True  # the loader's persistent_load decides (torch: storages)
            self.stack.append(Sym("opaque"))
        elif name in ("EXT1", "EXT2", "EXT4"):
            self.report.active = True
            self.dangerous(
                None, f"{name} imports through copyreg's extension registry, which a scan cannot see"
            )
            self.stack.append(Sym("opaque"))
        elif name == "NEXT_BUFFER":
            self.stack.append(Sym("opaque"))
        else:  # pragma: no cover - pickletools knows no other opcodes
            raise PickleParseError(f"unhandled opcode {name}")

    def _build(self, state: Sym) -> None:
        target = self.top()
        if target.kind == "global":
            self.dangerous(target.name, "BUILD sets attributes on an imported object instead of a new one")
            return
        if target.kind != "obj":
            return
        self.report.active = True
        target.state = _unwrap(state)
        if target.name == JOBLIB_WRAPPER and self.follow_joblib:
            follow_joblib_array(self, target)

    def _add_items(self, name: str) -> None:
        if name in ("APPEND", "SETITEM"):
            items = [self.pop() for _ in range(1 if name == "APPEND" else 2)][::-1]
        else:
            items = self.pop_mark()
        target = self.top()
        if target.kind == "global":
            self.dangerous(target.name, f"{name} mutates an imported object")
            return
        if target.kind != "lit":
            return
        values = [_unwrap(item) for item in items]
        try:
            if isinstance(target.value, dict):
                target.value.update(zip(values[::2], values[1::2], strict=False))
            elif isinstance(target.value, list):
                target.value.extend(values)
            else:
                raise TypeError("not a container")
        except TypeError:  # an unhashable key, or items added to a scalar
            target.kind, target.value = "opaque", None
            return
        if len(target.value) > TRACKED_ITEMS:
            target.kind, target.value = "opaque", None

    def _collection(self, name: str, items: list[Sym]) -> None:
        values = [_unwrap(item) for item in items]
        if name == "DICT":
            try:
                self.stack.append(_literal(dict(zip(values[::2], values[1::2], strict=False))))
            except TypeError:
                self.stack.append(Sym("opaque"))
        else:
            self.stack.append(_literal(tuple(values) if name == "TUPLE" else values))


def _literal(value: Any) -> Sym:
    if isinstance(value, tuple | list | dict) and len(value) > TRACKED_ITEMS:
        return Sym("opaque")
    return Sym("lit", value=value)


def follow_joblib_array(machine: PickleMachine, wrapper: Sym) -> None:
    """Step over the raw array joblib wrote right after this wrapper's BUILD (as its loader does).

    Also parse those bytes the way plain pickle.load would (as opcodes): a file crafted so that
    "array data" is a second, malicious opcode stream for non-joblib loaders is still caught.
    """
    reader = machine.reader
    start = reader.tell()
    if machine.budget.shadow_opcodes <= 0:
        raise PickleParseError("too many joblib arrays to check how plain pickle.load would read them")
    shadow = PickleMachine(reader, label=machine.label, tolerant=True, budget=machine.budget).run()
    machine.report.findings.extend(shadow.findings)
    reader.raw.seek(start)
    itemsize, has_object = _dtype_layout(wrapper.state)
    if has_object:
        # joblib pickles object arrays as a nested pickle with a fresh memo.
        nested = PickleMachine(reader, label=machine.label, follow_joblib=False, budget=machine.budget).run()
        machine.report.findings.extend(nested.findings)
        if nested.error is not None:
            raise PickleParseError(f"the object array after a joblib wrapper is unreadable: {nested.error}")
    else:
        state = wrapper.state
        shape = state.get("shape") if isinstance(state, dict) else None
        if not isinstance(shape, tuple) or not all(isinstance(dim, int) and dim >= 0 for dim in shape):
            raise PickleParseError("a joblib array wrapper has no readable shape")
        if state.get("numpy_array_alignment_bytes") is not None:
            padding = reader.raw.read(1)
            if not padding:
                raise PickleParseError("a joblib array is truncated before its padding")
            reader.raw.seek(padding[0], 1)
        size = math.prod(shape) * itemsize
        if reader.tell() + size > reader.size:
            raise PickleParseError("a joblib array runs past the end of the file")
        reader.raw.seek(size, 1)
    # The loader replaces the wrapper by the array it read.
    wrapper.kind, wrapper.name = "obj", "numpy.ndarray"


def _dtype_layout(state: Any) -> tuple[int, bool]:
    """(itemsize, has_object) of the numpy.dtype in a joblib wrapper's state, from its pickle."""
    dtype = state.get("dtype") if isinstance(state, dict) else None
    if not isinstance(dtype, Sym) or dtype.kind != "obj" or dtype.name != "numpy.dtype":
        raise PickleParseError("a joblib array wrapper has no numpy dtype")
    # numpy.dtype REDUCE args: (typestr, align, copy); BUILD state: (version, byteorder,
    # subarray, names, fields, elsize, alignment, flags[, metadata]).
    typestr = next(iter(dtype.args or ()), None) if isinstance(dtype.args, tuple) else None
    dstate = dtype.state
    if not isinstance(dstate, tuple) or len(dstate) < 8 or not isinstance(dstate[7], int):
        raise PickleParseError("a joblib array's dtype has an unreadable state")
    elsize, flags = dstate[5], dstate[7]
    if isinstance(elsize, int) and elsize > 0:
        itemsize = elsize
    else:
        digits = re.search(r"\d+$", typestr or "")
        if digits is None:
            raise PickleParseError(f"a joblib array's dtype {typestr!r} has no size")
        itemsize = int(digits.group())
    return itemsize, bool(flags & 1)  # NPY_ITEM_REFCOUNT: the dtype holds Python objects


def parse_stream(stream: IO[bytes], *, label: str, max_opcodes: int | None = None) -> PickleReport:
    """Run one pickle from the stream's position; the report says where it stopped and why."""
    return PickleMachine(StreamReader(stream), label=label).run(max_opcodes=max_opcodes)
