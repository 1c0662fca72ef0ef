"""The pickle globals a model file may import: an explicit allow-list; everything else is denied.

A pickle can only run code by importing a callable (GLOBAL, STACK_GLOBAL, INST) and calling it
(REDUCE, NEWOBJ, OBJ, BUILD's __setstate__). So the question "is this pickle safe to load" is
"does every import name something that only rebuilds data". The answer here is a list of the
names real model formats need, checked the same way by the scanner (statically, from opcodes)
and by the restricted unpicklers model servers load with (`find_class`):

- exact names: builtins containers, `collections`, `copyreg._reconstructor`, `_codecs.encode`
  (protocol 0-2 bytes), numpy arrays/dtypes/scalars/random-state constructors, scipy sparse
  matrices, joblib's `NumpyArrayWrapper`, and torch's tensor rebuild functions, storages and
  dtypes (mirroring torch's own weights-only unpickler, `torch/_weights_only_unpickler.py`);
- one package rule: classes defined under `sklearn.` (estimators and their Cython internals
  such as `sklearn.tree._tree.Tree` or `sklearn._loss._loss.CyHalfBinomialLoss`), plus the two
  rebuild helpers sklearn's extension types pickle with (`newObj`, `__pyx_unpickle_<Class>`).
  Why a package rule is acceptable there: sklearn's API contract is that constructors only
  store their parameters and `__setstate__` only restores attributes, and any callable an
  estimator calls later (FunctionTransformer's func, a kernel) is itself a pickled global that
  must pass this list. Statically a class is recognised by its name (PEP 8 CapWords, which
  sklearn follows); where sklearn is installed, `definition_problem` also imports it - only
  modules under the package, never test modules - and checks it really is a class *defined*
  there, so a re-exported foreign class (`sklearn.callback._progressbar.Thread`, which is
  threading.Thread) is refused. The scanner applies it where it can, the loader always.

Anything else (`builtins.getattr`/`eval`/`exec`, `os.*`, `subprocess.*`, `code.*`,
`importlib.*`, `functools.partial`, `operator.attrgetter`, `numpy.load`, `numpy.memmap`, torch's
`_rebuild_from_type_v2` with a foreign type, ...) is refused.

Standalone on purpose: stdlib only, no converge imports, so this one file can be copied next to
a restricted unpickler in another virtual environment (MLServer's, which lacks converge).
"""

from __future__ import annotations

import _compat_pickle
import functools
import importlib
import importlib.util
import io
import pickle
import re
from typing import Any

ALLOWLIST_VERSION = "1"

_BUILTINS: tuple[str, ...] = ("set", "frozenset", "slice", "complex", "bytearray", "bytes", "list")
_BUILTINS += ("dict", "tuple", "int", "float", "str", "bool", "object", "range")

_NUMPY_CORE = ("numpy.core", "numpy._core")
_NUMPY_SCALARS = (
    "bool_ bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 intc uintc intp uintp "
    "byte ubyte short ushort longlong ulonglong half single double longdouble float16 float32 "
    "float64 complex64 complex128 csingle cdouble clongdouble object_ str_ bytes_ void "
    "datetime64 timedelta64"
).split()
# Element-wise maths that pipelines pass as plain functions (FunctionTransformer(np.log1p)).
_NUMPY_UFUNCS = (
    "abs absolute cbrt ceil cos cosh exp exp2 expm1 fabs floor log log10 log1p log2 negative "
    "reciprocal rint sign sin sinh sqrt square tan tanh arcsinh arctan"
).split()
_NUMPY_RANDOM = (
    "numpy.random._pickle.__randomstate_ctor",
    "numpy.random._pickle.__generator_ctor",
    "numpy.random._pickle.__bit_generator_ctor",
    "numpy.random.mtrand.RandomState",
    "numpy.random._generator.Generator",
    "numpy.random._mt19937.MT19937",
    "numpy.random._pcg64.PCG64",
    "numpy.random._pcg64.PCG64DXSM",
    "numpy.random._philox.Philox",
    "numpy.random._sfc64.SFC64",
    "numpy.random.bit_generator.SeedSequence",
    "numpy.random.bit_generator.__pyx_unpickle_SeedSequence",
)
_SPARSE_FORMATS = ("csr", "csc", "coo", "bsr", "dia", "dok", "lil")

_TORCH_DTYPES = (
    "float64 float32 float16 bfloat16 int64 int32 int16 int8 uint8 uint16 uint32 uint64 bool "
    "complex128 complex64 complex32 qint8 qint32 quint8 quint4x2 quint2x4 float8_e5m2 "
    "float8_e4m3fn float8_e5m2fnuz float8_e4m3fnuz float8_e8m0fnu float4_e2m1fn_x2 bits1x8 "
    "bits2x4 bits4x2 bits8 bits16 int1 int2 int3 int4 int5 int6 int7 uint1 uint2 uint3 uint4 "
    "uint5 uint6 uint7"
).split()
_TORCH_STORAGE_KINDS = (
    "BFloat16 Bool Byte Char ComplexDouble ComplexFloat Double Float Half Int Long Short "
    "QInt32 QInt8 QUInt2x4 QUInt4x2 QUInt8"
).split()
_TORCH_TENSOR_KINDS = "BFloat16 Bool Byte Char Double Float Half Int Long Short".split()
_TORCH_REBUILDS = (
    "_rebuild_parameter _rebuild_parameter_with_state _rebuild_qtensor _rebuild_tensor "
    "_rebuild_tensor_v2 _rebuild_tensor_v3 _rebuild_sparse_tensor _rebuild_meta_tensor_no_storage "
    "_rebuild_nested_tensor _rebuild_wrapper_subclass _rebuild_device_tensor_from_numpy "
    "_rebuild_device_tensor_from_cpu_tensor"
).split()
_TORCH_QSCHEMES = (
    "per_tensor_affine per_tensor_symmetric per_channel_affine per_channel_symmetric "
    "per_channel_affine_float_qparams"
).split()


def _exact_names() -> frozenset[str]:
    names = {f"builtins.{name}" for name in _BUILTINS}
    names |= {"collections.OrderedDict", "collections.Counter", "collections.defaultdict"}
    names |= {"collections.deque", "copyreg._reconstructor", "_codecs.encode"}
    for core in _NUMPY_CORE:
        names |= {
            f"{core}.multiarray._reconstruct",
            f"{core}.multiarray.scalar",
            f"{core}.numeric._frombuffer",
        }
    names |= {"numpy.ndarray", "numpy.dtype", "numpy.ma.core.MaskedArray", "numpy.ma.MaskedArray"}
    names |= {"numpy.ma.core._mareconstruct", "numpy.matrix", "numpy.matrixlib.defmatrix.matrix"}
    names |= {f"numpy.{name}" for name in _NUMPY_SCALARS + _NUMPY_UFUNCS}
    names |= set(_NUMPY_RANDOM)
    for fmt in _SPARSE_FORMATS:
        for kind in ("matrix", "array"):
            names |= {f"scipy.sparse._{fmt}.{fmt}_{kind}", f"scipy.sparse.{fmt}_{kind}"}
        names.add(f"scipy.sparse.{fmt}.{fmt}_matrix")  # scipy < 1.8 module paths
    names.add("joblib.numpy_pickle.NumpyArrayWrapper")
    names |= {f"torch.{dtype}" for dtype in _TORCH_DTYPES}
    names |= {f"torch.{kind}Storage" for kind in _TORCH_STORAGE_KINDS}
    names |= {f"torch.cuda.{kind}Storage" for kind in _TORCH_STORAGE_KINDS if not kind.startswith("Q")}
    for prefix in ("torch", "torch.cuda", "torch.sparse", "torch.cuda.sparse"):
        kinds = [kind for kind in _TORCH_TENSOR_KINDS if kind != "Bool" or "sparse" not in prefix]
        names |= {f"{prefix}.{kind}Tensor" for kind in kinds}
    names |= {"torch.storage.TypedStorage", "torch.storage.UntypedStorage", "torch.Size", "torch.Tensor"}
    names |= {"torch.device", "torch.nn.parameter.Parameter", "torch.serialization._get_layout"}
    names |= {f"torch._utils.{name}" for name in _TORCH_REBUILDS}
    names |= {f"torch.{name}" for name in _TORCH_QSCHEMES}
    # Calls its first argument; every argument is itself a global checked against this list.
    names.add("torch._tensor._rebuild_from_type_v2")
    return frozenset(names)


EXACT_GLOBALS = _exact_names()
# Packages whose classes (and only classes) are allowed, see the module docstring.
CLASS_PACKAGES = ("sklearn",)
_CLASS_NAME = re.compile(r"_?[A-Z][A-Za-z0-9_]*")
# sklearn's extension types pickle through these module-level helpers; both only call
# `cls.__new__(cls)` on a class argument that is itself checked.
_PACKAGE_HELPERS = re.compile(r"newObj|__pyx_unpickle_[A-Za-z0-9_]+")
# Modules a model never references and that import test machinery when imported.
_EXCLUDED_PARTS = frozenset({"tests", "conftest", "_testing", "externals", "_build_utils", "__check_build"})
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")


def normalise(module: str, name: str) -> tuple[str, str]:
    """The names Python 3 imports for a protocol 0-2 pickle written by Python 2 (`__builtin__`...).

    The real unpickler applies this mapping only to protocol < 3; applying it always is safe:
    for protocol >= 3 the unmapped module (`__builtin__`) does not exist, so nothing loads.
    """
    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _package_of(module: str) -> str | None:
    for package in CLASS_PACKAGES:
        if module == package or module.startswith(package + "."):
            parts = set(module.split("."))
            return None if parts & _EXCLUDED_PARTS else package
    return None


def denial(module: str, name: str) -> str | None:
    """Why `module.name` may not be imported by a pickle, or None when it is allowed."""
    module, name = normalise(module, name)
    if not _MODULE.fullmatch(module) or not _IDENTIFIER.fullmatch(name):
        # Protocol 4 allows dotted names ("Klass.method"): a method or attribute, never data.
        return f"{module}.{name} is not a plain module-level name"
    if f"{module}.{name}" in EXACT_GLOBALS:
        return None
    if _package_of(module) is not None and (_CLASS_NAME.fullmatch(name) or _PACKAGE_HELPERS.fullmatch(name)):
        return None
    return f"{module}.{name} is not on the allow-list of pickle globals"


def is_allowed(module: str, name: str) -> bool:
    return denial(module, name) is None


@functools.lru_cache(maxsize=4096)
def definition_problem(module: str, name: str) -> str | None:
    """For a name allowed by the package rule: why the object it imports is not a class (or
    rebuild helper) defined inside the package, e.g. `sklearn.callback._progressbar.Thread`, a
    re-export of threading.Thread. None when it is, and for every other name.

    This imports `module`, which `denial` has confined to the package (test modules excluded).
    Where the package is not installed, None: the static rule stands, and the loader (which
    must have the package) runs this same check through `find_allowed`.
    """
    module, name = normalise(module, name)
    package = _package_of(module)
    if package is None or f"{module}.{name}" in EXACT_GLOBALS or denial(module, name) is not None:
        return None
    if importlib.util.find_spec(package) is None:
        return None
    try:
        value = getattr(importlib.import_module(module), name)
    except Exception as exc:  # ImportError, AttributeError, or whatever the module raises
        return f"{module}.{name} cannot be imported ({type(exc).__name__}: {exc})"
    defined_in = getattr(value, "__module__", None) or ""
    if defined_in != package and not defined_in.startswith(package + "."):
        return f"{module}.{name} re-exports an object defined in {defined_in or 'another package'}, outside {package}"
    if not (isinstance(value, type) and not issubclass(value, type)) and not _PACKAGE_HELPERS.fullmatch(name):
        return f"{module}.{name} is not a class"
    return None


def find_allowed(module: str, name: str) -> Any:
    """`Unpickler.find_class` for restricted loading: import only what `denial` allows.

    For the package rule the imported object must also be a class defined inside the package
    (or one of its rebuild helpers), so a re-export of a foreign object fails.
    """
    reason = denial(module, name) or definition_problem(module, name)
    if reason is not None:
        raise pickle.UnpicklingError(f"refused to load {reason}")
    module, name = normalise(module, name)
    return getattr(importlib.import_module(module), name)


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle.Unpickler that only imports allowed globals (extension codes go through here too)."""

    def find_class(self, module: str, name: str) -> Any:
        return find_allowed(module, name)


def restricted_loads(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data)).load()
