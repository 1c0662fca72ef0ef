"""Restricted scikit-learn loading for MLServer's environment: joblib.load, through the allow-list.

Defence in depth behind the registration scan: even if a hostile pickle got past it, the
replica's unpickler refuses to import anything `pickle_allowlist` does not allow, so the gadget
never gets a callable to call. This file runs inside `.venv-mlserver`, which does not have
converge installed: `install()` (called by `host.py`) copies it, as `converge_v2_restricted.py`,
together with `core/pickle_allowlist.py` (as `converge_pickle_allowlist.py`), into the folder
MLServer starts from, and `mlserver.py` puts that folder on its PYTHONPATH. So it imports nothing
from converge (but the allow-list, when it runs in Converge's own environment) and imports
mlserver only where MLServer runs it; nothing else in this package may be imported from here.

- `restricted_joblib_load(path)`: what `joblib.load` does for joblib and plain pickle files
  (compressed or not, inline numpy arrays included), with `find_class` restricted. joblib's
  pre-0.10 format, whose arrays live in side files it opens by names taken from the pickle, is
  refused.
- `restricted_skops_load(path)`: a skops file (MLflow's default for scikit-learn), trusting
  only the types the allow-list allows, never the list the model's MLmodel declares.
- `RestrictedSKLearnModel`: mlserver_sklearn's runtime, loading through the functions above
  (it also serves MLflow scikit-learn models: see `formats.mlflow_sklearn`).
- `RestrictedMLflowRuntime`: mlserver_mlflow's runtime, with `pickle.load`/`loads` (and
  cloudpickle's, which are the same functions) restricted while MLflow loads the model. MLflow
  has no unpickler hook of its own; the swap is process-wide but only lasts for the load, which
  MLServer runs before it serves anything (one model per server, no parallel workers).
"""

from __future__ import annotations

import contextlib
import io
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:  # MLServer's environment: the allow-list file is copied next to this one
    import converge_pickle_allowlist as allowlist  # type: ignore[import-not-found]
except ImportError:  # Converge's own environment (tests)
    from converge.core import pickle_allowlist as allowlist

SKLEARN_RUNTIME = "converge_v2_restricted.RestrictedSKLearnModel"
MLFLOW_RUNTIME = "converge_v2_restricted.RestrictedMLflowRuntime"
MODULE_NAME = "converge_v2_restricted"
ALLOWLIST_MODULE_NAME = "converge_pickle_allowlist"


def restricted_joblib_load(path: str | Path) -> Any:
    from joblib import numpy_pickle

    class RestrictedNumpyUnpickler(numpy_pickle.NumpyUnpickler):
        # joblib routes the nested pickles of object arrays through this same find_class.
        def find_class(self, module: str, name: str) -> Any:
            return allowlist.find_allowed(module, name)

    filename = str(path)
    with open(filename, "rb") as raw:
        # joblib's own detection of its compression wrappers (zlib, gzip, bz2, xz, lzma, lz4).
        with numpy_pickle._validate_fileobject_and_memmap(raw, filename, None) as (stream, _mmap):
            if isinstance(stream, str):
                raise pickle.UnpicklingError(
                    "joblib < 0.10 files keep arrays in side files named by the pickle; refused"
                )
            unpickler = RestrictedNumpyUnpickler(filename, stream, ensure_native_byte_order=True)
            return unpickler.load()


def restricted_skops_load(path: str | Path) -> Any:
    """A skops file, trusting only the types our allow-list allows.

    skops refuses types outside its own safe set unless the caller trusts them; MLflow trusts
    the list written in the model's own MLmodel, which the model's author controls. Here the
    types skops would refuse are trusted only when the pickle allow-list allows each of them.
    """
    import skops.io  # type: ignore[import-not-found]  # MLServer's environment has it; ours need not

    untrusted = skops.io.get_untrusted_types(file=str(path))
    for dotted in untrusted:
        module, _, name = dotted.rpartition(".")
        allowlist.find_allowed(module, name)  # raises UnpicklingError naming the refused type
    return skops.io.load(str(path), trusted=untrusted)


def restricted_load(path: str | Path) -> Any:
    """A scikit-learn model file: skops by its suffix (what MLflow writes), else joblib/pickle."""
    if str(path).endswith(".skops"):
        return restricted_skops_load(path)
    return restricted_joblib_load(path)


def _load(file: Any, **options: Any) -> Any:
    return allowlist.RestrictedUnpickler(file, **options).load()


def _loads(data: bytes, /, **options: Any) -> Any:
    return _load(io.BytesIO(data), **options)


@contextlib.contextmanager
def restricted_pickle_functions() -> Iterator[None]:
    """pickle.load/loads and cloudpickle.load/loads only unpickle allow-listed globals, for a while."""
    targets: list[Any] = [pickle]
    with contextlib.suppress(ImportError):
        import cloudpickle

        targets.append(cloudpickle)
    saved = [(module, module.load, module.loads) for module in targets]
    for module in targets:
        module.load, module.loads = _load, _loads
    try:
        yield
    finally:
        for module, load, loads in saved:
            module.load, module.loads = load, loads


def _sklearn_runtime() -> Any:
    from mlserver.utils import get_model_uri
    from mlserver_sklearn import SKLearnModel
    from mlserver_sklearn.sklearn import WELLKNOWN_MODEL_FILENAMES

    class RestrictedSKLearnModel(SKLearnModel):
        """mlserver_sklearn.SKLearnModel whose load() only unpickles allow-listed globals."""

        async def load(self) -> bool:
            model_uri = await get_model_uri(self._settings, wellknown_filenames=WELLKNOWN_MODEL_FILENAMES)
            self._model = restricted_load(model_uri)
            return True

    return RestrictedSKLearnModel


def _mlflow_runtime() -> Any:
    from mlserver_mlflow import MLflowRuntime

    class RestrictedMLflowRuntime(MLflowRuntime):
        """mlserver_mlflow.MLflowRuntime whose model loads with restricted pickle functions."""

        async def load(self) -> bool:
            with restricted_pickle_functions():
                loaded: bool = await super().load()
            return loaded

    return RestrictedMLflowRuntime


_RUNTIMES = {"RestrictedSKLearnModel": _sklearn_runtime, "RestrictedMLflowRuntime": _mlflow_runtime}


def __getattr__(name: str) -> Any:
    # Built on first use, so importing this module never needs mlserver (Converge's env lacks it).
    if name in _RUNTIMES:
        value = _RUNTIMES[name]()
        value.__module__ = __name__
        globals()[name] = value
        return value
    raise AttributeError(name)


# Runs in MLServer's environment before MLServer starts: load the model the way the runtime
# will, and report what its inputs look like.
PROBE = """
import json, sys
sys.path.insert(0, sys.argv[2])
from converge_v2_restricted import restricted_load
model = restricted_load(sys.argv[1])
n = getattr(model, "n_features_in_", None)
print(json.dumps({
    "type": type(model).__module__ + "." + type(model).__qualname__,
    "n_features": int(n) if n is not None else None,
    "feature_names": hasattr(model, "feature_names_in_"),
    "predict": callable(getattr(model, "predict", None)),
}))
"""


def install(folder: Path) -> Path:
    """Copy this module and the allow-list into `folder` under the names MLServer imports."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{MODULE_NAME}.py").write_text(Path(__file__).read_text(encoding="utf-8"), encoding="utf-8")
    source = Path(allowlist.__file__).read_text(encoding="utf-8")
    (folder / f"{ALLOWLIST_MODULE_NAME}.py").write_text(source, encoding="utf-8")
    return folder
