"""Files are checked before they are used: a cache must match its checksum and shapes, and no
array file may declare more than MAX_DECODED_BYTES, refused from its headers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentdiffusion import files
from latentdiffusion.data.idx import read_idx, write_idx
from latentdiffusion.data.npz import read_npz
from latentdiffusion.errors import DataError
from latentdiffusion.evaluation.classwise import ClassReference
from latentdiffusion.evaluation.metrics import FeatureStats, Reference
from latentdiffusion.evaluation.samples import load_samples


def _reference(d: int = 4) -> Reference:
    rng = np.random.default_rng(0)
    return Reference(FeatureStats(10, rng.normal(size=d), np.eye(d)),
                     rng.normal(size=(6, d)).astype(np.float32), "abc")


def _edit(path: Path, **changes: np.ndarray) -> None:
    with np.load(path) as f:
        arrays = {**{k: f[k] for k in f.files}, **changes}
    np.savez(path, **arrays)


def test_reference_cache_is_used_as_written(tmp_path: Path) -> None:
    path = tmp_path / "reference.npz"
    _reference().save(path)
    loaded = Reference.load(path, "abc")
    assert loaded is not None and np.array_equal(loaded.stats.mean, _reference().stats.mean)
    assert Reference.load(path, "another classifier") is None


def test_edited_reference_cache_is_recomputed(tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "reference.npz"
    _reference().save(path)
    _edit(path, mean=_reference().stats.mean + 5)
    assert Reference.load(path, "abc") is None
    assert "does not match its checksum" in caplog.text
    _reference().save(path)
    _edit(path, mean=np.full(4, np.nan))
    assert Reference.load(path, "abc") is None


def test_reference_cache_of_an_older_layout_is_recomputed_quietly(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "reference.npz"  # as written before caches carried a checksum
    reference = _reference()
    np.savez(path, n=np.array(10), mean=reference.stats.mean, cov=reference.stats.cov,
             subset=reference.subset, classifier_hash=np.array("abc"))
    with caplog.at_level("INFO"):
        assert Reference.load(path, "abc") is None
    assert "older layout" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_reference_cache_of_the_wrong_shape_is_recomputed(tmp_path: Path) -> None:
    path = tmp_path / "reference.npz"
    reference = _reference()
    files.write_checked_npz(path, n=np.array(10), mean=reference.stats.mean, cov=np.eye(3),
                            subset=reference.subset, classifier_hash=np.array("abc"))
    assert Reference.load(path, "abc") is None  # a valid checksum, a cov of the wrong shape
    classes = tmp_path / "classes.npz"
    files.write_checked_npz(classes, counts=np.ones(2), means=np.zeros((2, 4)),
                            covs=np.zeros((3, 4, 4)), classifier_hash=np.array("abc"))
    assert ClassReference.load(classes, "abc") is None


def test_oversized_arrays_are_refused_from_their_headers(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "MAX_DECODED_BYTES", 10_000)
    data = tmp_path / "b.npz"
    np.savez_compressed(data, train_images=np.zeros((20, 16, 16, 3), np.uint8),
                        test_images=np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(DataError, match="bytes once decoded, more than the 10,000"):
        read_npz(data)
    samples = tmp_path / "s.npz"
    np.savez_compressed(samples, images=np.zeros((20, 16, 16, 3), np.uint8))
    with pytest.raises(DataError, match="bytes once decoded"):
        load_samples(samples)
    reference = tmp_path / "reference.npz"
    _reference(d=40).save(reference)
    assert Reference.load(reference, "abc") is None
    idx = tmp_path / "images-idx3-ubyte.gz"
    write_idx(idx, np.zeros((20, 28, 28), np.uint8))
    with pytest.raises(DataError, match="bytes once decoded"):
        read_idx(idx, 2051)
