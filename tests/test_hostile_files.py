"""Files whose headers lie: IDX dimensions past 2**64 or past the data, gzip bombs, samples
.npz declaring a billion images, a model that is /dev/zero. Each is refused in one line after
reading its header, without allocating what the header claims (memory measured in a child)."""

from __future__ import annotations

import gzip
import io
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdiffusion.data.idx import IMAGE_MAGIC, LABEL_MAGIC, read_idx
from latentdiffusion.errors import CheckpointError, DataError
from latentdiffusion.evaluation import samples
from latentdiffusion.evaluation.samples import load_samples
from latentdiffusion.files import npz_headers
from latentdiffusion.run import checkpoint
from test_cli_errors import CPU, assert_fails

MiB = 1 << 20


def _gzip_with_zeros(path: Path, head: bytes, zeros: int) -> None:
    """`head` then `zeros` zero bytes, gzipped in blocks (a small file that expands a lot)."""
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    with open(path, "wb") as f:
        f.write(packer.compress(head))
        block = bytes(MiB)
        for start in range(0, zeros, MiB):
            f.write(packer.compress(block[:min(MiB, zeros - start)]))
        f.write(packer.flush())


def _peak_growth_mib(code: str) -> float:
    """Growth of the peak resident memory (MiB) of a fresh interpreter while running `code`,
    after the imports; an LdmError from `code` is expected and printed."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak memory")
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from latentdiffusion.data import idx
        from latentdiffusion.evaluation import samples
        from latentdiffusion.run import checkpoint
        from latentdiffusion.errors import LdmError

        def peak_kib():
            status = open("/proc/self/status").read()
            return int(status.split("VmHWM:")[1].split()[0])

        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak to the current size: the imports' peak is not ours
        before = peak_kib()
        try:
            {code}
        except LdmError as err:
            print(str(err)[:60], file=sys.stderr)
        print((peak_kib() - before) / 1024)
    """).format(code=code)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip())


# ---------------------------------------------------------------- IDX


def test_idx_dimensions_past_2_to_the_64(capsys: pytest.CaptureFixture[str],
                                         data_dir: Path) -> None:
    path = data_dir / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(struct.pack(">4I", IMAGE_MAGIC, 2**22, 2**22, 2**20)))
    assert_fails(capsys, 1, "data", "verify", "--data-dir", data_dir,
                 match=f"{path}: images are 4194304x1048576; they must be square")


def test_idx_declaring_more_items_than_any_mnist_file(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    path.write_bytes(gzip.compress(struct.pack(">2I", LABEL_MAGIC, 2**32 - 1)))
    with pytest.raises(DataError, match="declares 4294967295 items, more than the 1000000"):
        read_idx(path, LABEL_MAGIC)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_with_data_past_its_header(tmp_path: Path, gz: bool) -> None:
    path = tmp_path / ("images.gz" if gz else "images")
    head = struct.pack(">4I", IMAGE_MAGIC, 2, 28, 28)
    if gz:
        _gzip_with_zeros(path, head, 2 * 784 + 5)
    else:
        path.write_bytes(head + bytes(2 * 784 + 5))
    match = ("decompresses to more than the 1584 bytes its header 2x28x28 declares" if gz else
             r"size 1589 bytes does not match its header 2x28x28 \(1584 bytes\); it holds data "
             "past what its header declares")
    with pytest.raises(DataError, match=match):
        read_idx(path, IMAGE_MAGIC)


def test_idx_gzip_bomb_is_refused_without_decompressing_it(tmp_path: Path) -> None:
    # 10 images declared, 64 MiB inside (a 65 kB file): the reader stops one byte past the 10.
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    _gzip_with_zeros(path, struct.pack(">4I", IMAGE_MAGIC, 10, 28, 28), 64 * MiB)
    growth = _peak_growth_mib(f"idx.read_idx(Path({str(path)!r}), idx.IMAGE_MAGIC)")
    assert growth < 16, growth


def test_idx_header_promising_far_more_than_the_file_holds(tmp_path: Path) -> None:
    # 999,999 images declared (784 MB, within MAX_DECODED_BYTES), 100 present: only what is
    # there is ever touched.
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    _gzip_with_zeros(path, struct.pack(">4I", IMAGE_MAGIC, 999_999, 28, 28), 100 * 784)
    with pytest.raises(DataError, match="the file is truncated"):
        read_idx(path, IMAGE_MAGIC)
    growth = _peak_growth_mib(f"idx.read_idx(Path({str(path)!r}), idx.IMAGE_MAGIC)")
    assert growth < 16, growth



# ---------------------------------------------------------------- samples .npz


def _npz_declaring(path: Path, shape: tuple[int, ...], data: bytes, descr: str = "|u1") -> None:
    """An .npz whose images.npy header declares `shape` but holds `data`."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": descr, "fortran_order": False,
                                                  "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("images.npy", header.getvalue() + data)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_headers_name_shape_and_dtype_of_each_array(tmp_path: Path, save) -> None:
    path = tmp_path / "arrays.npz"
    save(path, images=np.zeros((3, 5, 5, 3), np.uint8), labels=np.arange(3, dtype=np.int64),
         names=np.array(["a", "bc"]), scalar=np.float32(1.0))
    assert npz_headers(path) == {"images": ((3, 5, 5, 3), np.dtype(np.uint8)),
                                 "labels": ((3,), np.dtype(np.int64)),
                                 "names": ((2,), np.dtype("<U2")),
                                 "scalar": ((), np.dtype(np.float32))}


def test_npz_headers_refuse_a_header_that_does_not_fit_its_member(tmp_path: Path) -> None:
    path = tmp_path / "short.npz"
    _npz_declaring(path, (4, 28, 28), bytes(3 * 784))  # one image short
    with pytest.raises(DataError, match=r"images.npy declares \(4, 28, 28\) uint8 \(3264 bytes\) "
                                        "but holds 2480 bytes; the file is corrupt"):
        npz_headers(path)


def test_npz_declaring_a_billion_images(capsys: pytest.CaptureFixture[str],
                                        tmp_path: Path) -> None:
    path = tmp_path / "huge.npz"
    _npz_declaring(path, (10**9, 28, 28), bytes(2 * 784))
    line = assert_fails(capsys, 1, "evaluate", "--samples", path, "--run-dir", tmp_path / "run",
                        *CPU, match=f"{path}: images.npy declares (1000000000, 28, 28)")
    assert "holds 1696 bytes; the file is corrupt" in line


def test_npz_with_more_images_than_one_evaluation_holds(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samples, "MAX_SAMPLES", 10)
    path = tmp_path / "many.npz"
    np.savez(path, images=np.zeros((11, 28, 28), np.uint8))
    with pytest.raises(DataError, match="11 images, more than the 10 one evaluation holds"):
        load_samples(path)


def test_npz_of_the_wrong_shape_is_refused_before_loading(tmp_path: Path) -> None:
    # 60 MiB of (N, 32, 30) images in a 61 kB file: refused from its header alone.
    path = tmp_path / "wrong.npz"
    np.savez_compressed(path, images=np.zeros((65536, 32, 30), np.uint8))
    with pytest.raises(DataError, match=r"with N > 0, got \(65536, 32, 30\)"):
        load_samples(path)
    growth = _peak_growth_mib(f"samples.load_samples({str(path)!r})")
    assert growth < 16, growth


@pytest.mark.parametrize("descr", ["<f4", "|O"])
def test_npz_of_the_wrong_dtype_is_refused_from_its_header(tmp_path: Path, descr: str) -> None:
    path = tmp_path / "wrong.npz"
    _npz_declaring(path, (2, 28, 28), bytes(2 * 784 * (4 if descr == "<f4" else 8)), descr)
    with pytest.raises(DataError, match="images must be uint8"):
        load_samples(path)


# ---------------------------------------------------------------- model files


def test_model_that_is_a_link_to_dev_zero(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "vae.safetensors").symlink_to("/dev/zero")
    assert_fails(capsys, 1, "sample", "--model", "vae", "-n", "2", "--out", tmp_path / "s.npz",
                 "--run-dir", run, *CPU, match=f"{run / 'vae.safetensors'} is not a regular file")
    assert checkpoint.peek(run / "vae.safetensors") is None


def test_model_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "vae.safetensors").mkdir()
    with pytest.raises(CheckpointError, match="is not a regular file"):
        checkpoint.load(tmp_path / "vae.safetensors")


def test_model_whose_header_claims_more_than_the_file(tmp_path: Path) -> None:
    path = tmp_path / "vae.safetensors"
    path.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match=f"its header claims {2**62} bytes, the file has 10"):
        checkpoint.load(path)


def test_model_file_too_large_to_be_ours(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vae.safetensors"
    checkpoint.save(path, {"w": torch.zeros(1000)}, kind="vae")
    monkeypatch.setattr(checkpoint, "MAX_CHECKPOINT_BYTES", 1000)
    with pytest.raises(CheckpointError, match="more than the 1000 a latentdiffusion checkpoint"):
        checkpoint.load(path)
