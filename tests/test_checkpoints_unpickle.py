"""The restricted unpickler: malicious pickles are refused without running, tensors rebuild exactly."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from clipforge.checkpoints import CheckpointError, UnsafeCheckpointError, read_weights
from clipforge.checkpoints.safe_unpickle import read_archive, safe_loads


class Payload:
    """Pickles as a call of `fn(*args)`: what a malicious weights file does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _marker_payload(marker: Path) -> Payload:
    return Payload(os.system, f"touch {marker}")


def _write_archive(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A zip laid out like torch.save's: <name>/data.pkl, <name>/data/<key>, version, byteorder."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        for key, raw in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", "3\n")
        zf.writestr("archive/byteorder", "little")
    return path


def _assert_refused(err: pytest.ExceptionInfo, path: Path, marker: Path) -> None:
    assert err.value.global_name in ("os.system", "posix.system", "nt.system")
    assert err.value.global_name in str(err.value) and str(path) in str(err.value)
    assert not marker.exists()


def test_zip_archive_with_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = _write_archive(tmp_path / "evil.pt", pickle.dumps(_marker_payload(marker), protocol=2))
    with pytest.raises(UnsafeCheckpointError) as err:
        read_weights(path)
    _assert_refused(err, path, marker)


def test_raw_pickle_with_os_system_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_marker_payload(marker)))
    with pytest.raises(UnsafeCheckpointError) as err:
        read_weights(path)
    _assert_refused(err, path, marker)


def test_payload_hidden_in_a_real_torch_save_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "state.pt"
    torch.save({"weight": torch.ones(3), "extra": _marker_payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        read_weights(path)
    _assert_refused(err, path, marker)


def test_payload_in_a_legacy_torch_save_file_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2), "x": _marker_payload(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError) as err:
        read_weights(path)
    _assert_refused(err, path, marker)


@pytest.mark.parametrize(
    "fn, name",
    [
        (eval, "builtins.eval"),
        (getattr, "builtins.getattr"),
        (__import__("subprocess").Popen, "subprocess.Popen"),
        (torch.load, "torch.serialization.load"),
        (torch.nn.Module, "torch.nn.modules.module.Module"),
    ],
)
def test_any_other_global_is_refused_by_name(tmp_path, fn, name):
    path = _write_archive(tmp_path / "evil.pt", pickle.dumps(Payload(fn, "1"), protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=name.replace(".", r"\.")):
        read_archive(path)
    with pytest.raises(UnsafeCheckpointError, match=name.replace(".", r"\.")):
        safe_loads(pickle.dumps(Payload(fn, "1")))


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "f32": base,
        "f16": base.half(),
        "bf16": base.bfloat16(),
        "f64": base.double(),
        "i64": torch.arange(7),
        "bool": base > 0,
        "scalar": torch.tensor(224),
        "view": base[1:4, ::2],  # offset and strides into a shared storage
        "transposed": base.t(),
        "empty": torch.empty(0, 3),
    }


def test_tensors_rebuild_exactly_like_torch_load(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(_tensors(), path)
    ours = read_archive(path)
    reference = torch.load(path, weights_only=True)  # a plain zip we just wrote: safe to compare against
    assert list(ours) == list(reference)
    for key, value in reference.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, key
        assert ours[key].stride() == value.stride(), key
        assert torch.equal(ours[key], value), key


def test_state_dict_with_metadata_and_parameters(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    path = tmp_path / "sd.pt"
    torch.save({"sd": module.state_dict(), "param": torch.nn.Parameter(torch.ones(2))}, path)
    obj = read_archive(path)
    assert isinstance(obj["sd"], OrderedDict) and obj["sd"]._metadata[""] == {"version": 1}
    assert torch.equal(obj["sd"]["0.weight"], module[0].weight.detach())
    assert torch.equal(obj["param"], torch.ones(2))


def test_zip_path_never_calls_torch_load(tmp_path, monkeypatch):
    path = tmp_path / "sd.pt"
    torch.save(_tensors(), path)

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load / torch.jit.load must not be called on a zip archive")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.jit, "load", forbidden)
    assert torch.equal(read_weights(path).state_dict["f16"], _tensors()["f16"])


class _Ref:
    """Pickles as a persistent reference to storage "0" (four floats)."""


def _crafted(size: tuple[int, ...], stride: tuple[int, ...], offset: int = 0) -> bytes:
    class Rebuild:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (_Ref(), offset, size, stride, False, OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if isinstance(obj, _Ref) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump({"t": Rebuild()})
    return buf.getvalue()


def test_crafted_tensor_record_loads(tmp_path):
    raw = torch.tensor([1.0, 2.0, 3.0, 4.0]).numpy().tobytes()
    path = _write_archive(tmp_path / "ok.pt", _crafted((2,), (2,), 1), {"0": raw})
    assert read_archive(path)["t"].tolist() == [2.0, 4.0]


@pytest.mark.parametrize("size, stride, offset", [((5,), (1,), 0), ((2, 2), (2, 1), 1), ((3,), (2,), 0)])
def test_tensor_record_overrunning_its_storage_is_refused(tmp_path, size, stride, offset):
    raw = torch.zeros(4).numpy().tobytes()
    path = _write_archive(tmp_path / "bad.pt", _crafted(size, stride, offset), {"0": raw})
    with pytest.raises(CheckpointError, match="overruns"):
        read_archive(path)


def test_missing_or_short_storage_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        read_archive(_write_archive(tmp_path / "a.pt", _crafted((4,), (1,))))
    with pytest.raises(CheckpointError, match="holds 8 bytes"):
        read_archive(_write_archive(tmp_path / "b.pt", _crafted((4,), (1,)), {"0": b"\0" * 8}))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError):
        read_weights(path)
    with zipfile.ZipFile(tmp_path / "plain.zip", "w") as zf:
        zf.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="not a PyTorch archive"):
        read_weights(tmp_path / "plain.zip")
