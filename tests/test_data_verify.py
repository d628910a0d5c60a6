"""dpcnn.h5format.verify: the arrays themselves checked against their stored SHA-256, by prepare and info."""

import shlex

import h5py
import numpy as np
import pytest
from _idx import info_for, make_arrays, payloads, write_file

from dpcnn.datasets import DATASETS
from dpcnn.h5format import DataError, Split, array_sha256, verify
from dpcnn.idx import prepare_dataset
from dpcnn.prepare import main as prepare_main


def mostly_zeros(tmp_path):
    """A source like MNIST: images mostly 0 (a border of zeros around random strokes)."""
    arrays = make_arrays()
    for x, _ in arrays.values():
        x[:, :4, :] = 0
    files = payloads(arrays)
    (tmp_path / "src").mkdir()
    for name, payload in files.items():
        write_file(tmp_path / "src" / name, payload, gz=True)
    return info_for(files), arrays


@pytest.fixture
def prepared(tmp_path):
    info, arrays = mostly_zeros(tmp_path)
    return prepare_dataset(source=tmp_path / "src", out=tmp_path / "tiny.h5", info=info), info


def flip_zeros_to_ff(path, n=16):
    """Set n zero bytes of train/images to 0xFF in the file: Fletcher-32 sums 16-bit words modulo
    65535, so a 0x0000 word that becomes 0xFFFF leaves every chunk checksum as it was."""
    with h5py.File(path, "r") as f:
        ds = f["train/images"]
        start = ds.id.get_chunk_info(0).byte_offset      # row 0 of chunk 0: its first 4 rows are zeros
        assert not ds[0, :4].any()
    raw = bytearray(path.read_bytes())
    assert raw[start:start + n] == bytes(n)
    raw[start:start + n] = b"\xff" * n
    path.write_bytes(bytes(raw))


def test_prepare_stores_the_sha256_of_every_array(prepared):
    path, _ = prepared
    with h5py.File(path, "r") as f:
        for split in ("train", "test"):
            for name in ("images", "labels"):
                ds = f[split][name]
                assert ds.attrs["sha256"] == array_sha256(ds[...])
    assert verify(path) is True


def test_verify_catches_what_fletcher32_misses(prepared):
    path, _ = prepared
    flip_zeros_to_ff(path)
    with Split(path) as s:                                # the chunk checksums still pass ...
        assert s.rows(np.arange(s.n))[0, 0, :16].tolist() == [255] * 16
    with pytest.raises(DataError) as e:                   # ... the array's SHA-256 does not
        verify(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: train/images differs from the data written")
    # the advice is the command that made the file, and it makes it again
    src = path.parent / "src"
    assert msg.endswith(f"the file is damaged: prepare it again: python -m dpcnn.data prepare --dataset tiny "
                        f"--source {src} --out {path} --force")


def test_the_damage_advice_prepares_the_file_again(prepared, monkeypatch):
    path, info = prepared
    flip_zeros_to_ff(path)
    with pytest.raises(DataError) as e:
        verify(path)
    command = shlex.split(str(e.value).split("prepare it again: ", 1)[1])
    assert command[:4] == ["python", "-m", "dpcnn.data", "prepare"]
    monkeypatch.setitem(DATASETS, "tiny", info)
    assert prepare_main(command[4:]) == 0 and verify(path) is True


def test_verify_reports_a_failing_chunk(prepared):
    path, _ = prepared
    with h5py.File(path, "r") as f:
        start = f["test/images"].id.get_chunk_info(0).byte_offset
    raw = bytearray(path.read_bytes())
    raw[start + 3000:start + 3010] = bytes(255 - b for b in raw[start + 3000:start + 3010])
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"tiny\.h5: cannot read test/images .*damaged: prepare it again: "
                                        r"python -m dpcnn.data prepare --dataset tiny --source .* --force$"):
        verify(path)


def test_verify_without_checksums_is_not_verified(prepared):
    """A file written before the sha256 attributes existed still reads: verify says False."""
    path, _ = prepared
    with h5py.File(path, "r+") as f:
        for split in ("train", "test"):
            for name in ("images", "labels"):
                del f[split][name].attrs["sha256"]
    assert verify(path) is False


def test_prepare_redoes_a_file_that_does_not_verify(tmp_path, prepared, caplog):
    """'already prepared and verified' must be true: a damaged or unverifiable file is rewritten."""
    path, info = prepared
    flip_zeros_to_ff(path)
    prepare_dataset(source=tmp_path / "src", out=path, info=info)
    assert "train/images differs" in caplog.text and "preparing it again" in caplog.text
    assert verify(path) is True
    with h5py.File(path, "r+") as f:
        del f["test/labels"].attrs["sha256"]
    caplog.clear()
    prepare_dataset(source=tmp_path / "src", out=path, info=info)
    assert "not verified" in caplog.text and verify(path) is True
    caplog.clear()
    caplog.set_level("INFO", logger="dpcnn")
    prepare_dataset(source=tmp_path / "src", out=path, info=info)
    assert "already prepared and verified" in caplog.text


def test_info_shows_verified_or_the_failure(prepared, capsys):
    path, _ = prepared
    assert prepare_main(["info", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "verified       yes: every array matches its SHA-256"
    flip_zeros_to_ff(path)
    assert prepare_main(["info", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "dataset        tiny" in out and out.splitlines()[-1] == "verified       FAILED (see the error)"
    assert err.startswith(f"error: {path}: train/images differs") and err.count("\n") == 1
    with h5py.File(path, "r+") as f:
        del f["train/images"].attrs["sha256"]
    assert prepare_main(["info", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("verified       no: not verified")
