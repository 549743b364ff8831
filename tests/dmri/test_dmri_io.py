from pathlib import Path

import numpy as np
import pytest

from bioinverse.dmri.io import (
    DiffusionData,
    GradientTable,
    read_bvals_bvecs,
    read_dwi,
    read_map,
    read_mask,
    write_bvals_bvecs,
    write_dwi,
    write_map,
    write_mask,
)
from bioinverse.errors import InputError


def _write(tmp_path, bvals_text, bvecs_text):
    (tmp_path / "x.bval").write_text(bvals_text)
    (tmp_path / "x.bvec").write_text(bvecs_text)
    return tmp_path / "x.bval", tmp_path / "x.bvec"


def test_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    g = rng.standard_normal((10, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    g[0] = 0
    b = np.r_[0, np.full(4, 1000.0), np.full(5, 3000.0)]
    write_bvals_bvecs(GradientTable(b, g), tmp_path / "a.bval", tmp_path / "a.bvec")
    table = read_bvals_bvecs(tmp_path / "a.bval", tmp_path / "a.bvec")
    np.testing.assert_allclose(table.bvals, b)
    np.testing.assert_allclose(table.bvecs, g, atol=1e-5)
    assert table.shells() == [(0.0, 1), (1000.0, 4), (3000.0, 5)]
    assert table.b0s_mask.sum() == 1


def test_transposed_bvecs_accepted(tmp_path):
    paths = _write(tmp_path, "0 1000 1000 1000", "0 0 0\n1 0 0\n0 1 0\n0 0 1\n")
    np.testing.assert_array_equal(
        read_bvals_bvecs(*paths).bvecs, [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    )


@pytest.mark.parametrize(
    "bvals, bvecs, problem",
    [
        ("", "1 0\n0 1\n0 0", "is empty"),
        ("0 1000 abc", "0 1 0\n0 0 1\n0 0 0", "not a number"),
        ("0 1000", "0 1 0\n0 0 1\n0 0 0", "has 3 directions but x.bval has 2"),
        ("0 1000 -5", "0 1 0\n0 0 1\n0 0 0", "negative"),
        ("0 1 3", "0 1 0\n0 0 1\n0 0 0", "ms/µm²"),
        ("0 1000 1000", "0 1 0\n0 0 0.5\n0 0 0", "norm 0.500"),
        ("0 1000 nan", "0 1 0\n0 0 1\n0 0 0", "NaN"),
        ("0 1000 1000", "0 1 0\n0 0 1\n0 0", "different numbers of values"),
    ],
)
def test_bad_tables(tmp_path, bvals, bvecs, problem):
    paths = _write(tmp_path, bvals, bvecs)
    with pytest.raises(InputError, match=problem) as exc:
        read_bvals_bvecs(*paths)
    assert exc.value.source is not None and exc.value.source.startswith(str(tmp_path))


# --------------------------------------------------------------------------- GradientTable


def _table(n_dirs=6, seed=0, b=1000.0):
    g = np.random.default_rng(seed).standard_normal((n_dirs, 3))
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    return GradientTable(np.r_[0.0, np.full(n_dirs, b)], np.vstack([np.zeros(3), g]))


def test_gradient_table_coerces_and_keeps_timings():
    gtab = GradientTable(
        [0, 1000], [[0, 0, 0], [0, 0, 1.005]], small_delta=10.0, big_delta=30.0, echo_time=80.7
    )
    assert gtab.bvals.dtype == np.float64 and gtab.bvecs.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(gtab.bvecs[1]), 1.0)  # within tolerance → renormalised
    assert not gtab.bvals.flags.writeable
    sub = gtab.subset([1])
    assert (sub.small_delta, sub.big_delta, sub.echo_time, sub.b0_threshold) == (10.0, 30.0, 80.7, 50.0)
    np.testing.assert_array_equal(gtab.subset(np.array([True, False])).bvals, [0.0])


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"bvals": [[0, 1000]], "bvecs": [[0, 0, 0], [1, 0, 0]]}, "shape \\(n,\\)"),
        ({"bvals": [0, 1000], "bvecs": [[0, 0, 0]]}, "shape \\(2, 3\\)"),
        ({"bvals": [0, np.nan], "bvecs": [[0, 0, 0], [1, 0, 0]]}, "NaN or Inf"),
        ({"bvals": [0, np.inf], "bvecs": [[0, 0, 0], [1, 0, 0]]}, "NaN or Inf"),
        ({"bvals": [0, -5], "bvecs": [[0, 0, 0], [1, 0, 0]]}, "negative"),
        ({"bvals": [0, 1000], "bvecs": [[0, 0, 0], [0, 0, 0]]}, "norm 0.000"),
        ({"bvals": [0, 1000], "bvecs": [[0, 0, 0], [1, 1, 0]]}, "norm 1.414"),
        ({"bvals": [0, 1000], "bvecs": [[0, 0, 0], [1, 0, 0]], "echo_time": 0.0}, "echo_time"),
        ({"bvals": [0, 1000], "bvecs": [[0, 0, 0], [1, 0, 0]], "small_delta": -1.0}, "small_delta"),
        (
            {"bvals": [0, 1000], "bvecs": [[0, 0, 0], [1, 0, 0]], "small_delta": 20, "big_delta": 10},
            "shorter",
        ),
    ],
)
def test_gradient_table_rejects_bad_input(kwargs, problem):
    with pytest.raises(InputError, match=problem) as exc:
        GradientTable(**kwargs)
    assert exc.value.source == "gtab"


def test_find_round_trips_permuted_sign_flipped_subset():
    full = _table(30, seed=1)
    rng = np.random.default_rng(2)
    wanted = rng.permutation(len(full))[:10]
    sub = full.subset(wanted)
    # The new scan lists the same measurements in another order, some directions negated, with
    # scanner jitter in b and direction.
    order = rng.permutation(len(full))
    flips = np.where(rng.random(len(full)) < 0.5, -1.0, 1.0)[:, None]
    jitter = rng.normal(scale=2e-3, size=(len(full), 3)) * ~full.b0s_mask[:, None]
    scan_vecs = full.bvecs[order] * flips + jitter[order]
    scan_vecs[~full.b0s_mask[order]] /= np.linalg.norm(
        scan_vecs[~full.b0s_mask[order]], axis=1, keepdims=True
    )
    scan = GradientTable(full.bvals[order] + np.where(full.bvals[order] > 0, 5.0, 0.0), scan_vecs)
    index = scan.find(sub)
    np.testing.assert_array_equal(order[index], wanted)
    assert len(set(index.tolist())) == len(index)


def test_find_uses_each_measurement_once_and_reports_missing():
    scan = GradientTable([0, 1000, 1000], [[0, 0, 0], [1, 0, 0], [0, 1, 0]])
    twice = GradientTable([1000, 1000], [[1, 0, 0], [-1, 0, 0]])
    with pytest.raises(
        InputError, match="measurement 1 \\(b=1000 s/mm², direction \\(-1.000, 0.000, 0.000\\)\\)"
    ):
        scan.find(twice)
    other_shell = GradientTable([0, 2000], [[0, 0, 0], [0, 1, 0]])
    with pytest.raises(InputError, match="measurement 1 \\(b=2000"):
        scan.find(other_shell)
    tilted = GradientTable([1000], [[np.cos(0.1), np.sin(0.1), 0]])  # 5.7° off
    with pytest.raises(InputError, match="no unused match within 20 s/mm² and 2°"):
        scan.find(tilted)
    assert scan.find(tilted, angle_tol_deg=6.0).tolist() == [1]
    with pytest.raises(InputError, match="b=0 measurement 1"):
        scan.find(GradientTable([0, 0], np.zeros((2, 3))))


def test_find_prefers_an_assignment_that_matches_everything():
    # Scan directions at 0° and 1.5°; requests at 1° and 3°. Greedy matching would give the first
    # request its closest candidate (1.5°), leaving the second (only 1.5° matches it) without one;
    # the optimal assignment serves both.
    def direction(deg):
        return [np.cos(np.deg2rad(deg)), np.sin(np.deg2rad(deg)), 0.0]

    scan = GradientTable([1000, 1000], [direction(0.0), direction(1.5)])
    wanted = GradientTable([1000, 1000], [direction(1.0), direction(3.0)])
    assert scan.find(wanted).tolist() == [0, 1]


# --------------------------------------------------------------------------- NIfTI readers and writers


def _scan(tmp_path, shape=(3, 4, 2), n_dirs=5, suffix=".nii.gz", seed=0):
    gtab = _table(n_dirs, seed)
    rng = np.random.default_rng(seed)
    data = rng.uniform(10, 1000, size=(*shape, len(gtab))).astype(np.float32)
    affine = np.array([[2.5, 0, 0, -30], [0, 2.5, 0, 12], [0, 0, 2.5, 4.5], [0, 0, 0, 1.0]])
    paths = {
        "dwi": write_dwi(tmp_path / f"dwi{suffix}", data, affine),
        "bvals": tmp_path / "dwi.bval",
        "bvecs": tmp_path / "dwi.bvec",
    }
    write_bvals_bvecs(gtab, paths["bvals"], paths["bvecs"])
    return paths, data, affine, gtab


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_dwi_round_trip(tmp_path, suffix):
    paths, data, affine, gtab = _scan(tmp_path, suffix=suffix)
    mask = np.zeros(data.shape[:3], bool)
    mask[1:, :2] = True
    write_mask(tmp_path / "mask.nii.gz", mask, affine)
    dwi = read_dwi(paths["dwi"], paths["bvals"], paths["bvecs"], tmp_path / "mask.nii.gz")
    assert isinstance(dwi, DiffusionData) and dwi.data.dtype == np.float32
    np.testing.assert_array_equal(dwi.data, data)
    np.testing.assert_allclose(dwi.affine, affine)
    np.testing.assert_array_equal(dwi.mask, mask)
    np.testing.assert_allclose(dwi.gtab.bvals, gtab.bvals)
    np.testing.assert_allclose(dwi.gtab.bvecs, gtab.bvecs, atol=1e-6)
    np.testing.assert_array_equal(dwi.voxels(), data[mask])
    back = dwi.unmask(dwi.voxels())
    np.testing.assert_array_equal(back, np.where(mask[..., None], data, 0))
    assert dwi.unmask(np.ones(mask.sum())).sum() == mask.sum()
    with pytest.raises(InputError, match="values"):
        dwi.unmask(np.ones(mask.sum() + 1))
    if suffix == ".nii.gz":
        assert paths["dwi"].read_bytes()[:2] == b"\x1f\x8b"  # the temporary name kept the .gz suffix
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")) == []


def test_dwi_without_mask_uses_all_voxels(tmp_path):
    paths, data, _, _ = _scan(tmp_path)
    dwi = read_dwi(paths["dwi"], paths["bvals"], paths["bvecs"])
    assert dwi.mask.all() and dwi.voxels().shape == (data[..., 0].size, data.shape[-1])


def test_map_and_mask_round_trip(tmp_path):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    values = np.random.default_rng(0).uniform(0, 3e-3, size=(4, 3, 2))
    write_map(tmp_path / "md.nii.gz", values, affine)
    back, back_affine = read_map(tmp_path / "md.nii.gz")
    np.testing.assert_allclose(back, values.astype(np.float32))
    np.testing.assert_allclose(back_affine, affine)
    write_dwi(tmp_path / "one.nii", values[..., None], affine)  # 4D with one volume reads as a map
    assert read_map(tmp_path / "one.nii")[0].shape == (4, 3, 2)
    write_mask(tmp_path / "m.nii", values > 1e-3, affine)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.nii", shape=(4, 3, 2)), values > 1e-3)
    write_map(tmp_path / "soft.nii", np.where(values > 1e-3, 0.4, 0.0), affine)  # nonzero = inside
    np.testing.assert_array_equal(read_mask(tmp_path / "soft.nii"), values > 1e-3)


def _expect(problem, source, call, *args, **kwargs):
    with pytest.raises(InputError, match=problem) as exc:
        call(*args, **kwargs)
    assert exc.value.source == str(source)
    assert source.name in str(exc.value)


def test_dwi_volume_count_must_match_bvals(tmp_path):
    paths, data, affine, _ = _scan(tmp_path)
    write_dwi(paths["dwi"], data[..., :-1], affine)
    _expect("has 5 volumes but dwi.bval has 6 b-values", paths["dwi"], read_dwi, *paths.values())


def test_dwi_reports_bad_gradient_directions(tmp_path):
    paths, *_ = _scan(tmp_path)
    (tmp_path / "zero.bvec").write_text("0 0 1 0 1 0\n0 1 0 0 0 1\n0 0 0 0 0 0\n")
    _expect(
        "direction 3 \\(b=1000\\) has norm 0.000",
        tmp_path / "zero.bvec",
        read_dwi,
        paths["dwi"],
        paths["bvals"],
        tmp_path / "zero.bvec",
    )
    (tmp_path / "long.bvec").write_text("0 0 1 0 1 0\n0 1 0 1 0 1\n0 0 0 1 0 0\n")
    _expect(
        "direction 3 \\(b=1000\\) has norm 1.414",
        tmp_path / "long.bvec",
        read_dwi,
        paths["dwi"],
        paths["bvals"],
        tmp_path / "long.bvec",
    )
    (tmp_path / "short.bvec").write_text("0 0 1 0 1\n0 1 0 1 0\n0 0 0 0 0\n")
    _expect(
        "has 5 directions but dwi.bval has 6",
        tmp_path / "short.bvec",
        read_dwi,
        paths["dwi"],
        paths["bvals"],
        tmp_path / "short.bvec",
    )


def test_dwi_rejects_nan_and_3d(tmp_path):
    paths, data, affine, _ = _scan(tmp_path)
    import nibabel as nib

    bad = data.copy()
    bad[1, 2, 0, 4] = np.nan
    nib.save(nib.Nifti1Image(bad, affine), tmp_path / "nan.nii.gz")  # bypasses the validating writer
    _expect(
        "NaN or Inf \\(first at voxel \\(1, 2, 0\\), volume 4\\)",
        tmp_path / "nan.nii.gz",
        read_dwi,
        tmp_path / "nan.nii.gz",
        paths["bvals"],
        paths["bvecs"],
    )
    write_map(tmp_path / "flat.nii.gz", data[..., 0], affine)
    _expect(
        "is 3D; a diffusion series must be 4D \\(X, Y, Z, volumes\\)",
        tmp_path / "flat.nii.gz",
        read_dwi,
        tmp_path / "flat.nii.gz",
        paths["bvals"],
        paths["bvecs"],
    )
    negative = data - 500  # rescaled scanner data may dip below zero: accepted
    write_dwi(tmp_path / "neg.nii", negative, affine)
    assert read_dwi(tmp_path / "neg.nii", paths["bvals"], paths["bvecs"]).data.min() < 0


def test_mask_problems(tmp_path):
    paths, data, affine, _ = _scan(tmp_path)
    write_mask(tmp_path / "empty.nii.gz", np.zeros(data.shape[:3]), affine)
    _expect("mask is empty", tmp_path / "empty.nii.gz", read_dwi, *paths.values(), tmp_path / "empty.nii.gz")
    write_mask(tmp_path / "small.nii.gz", np.ones((3, 4, 3)), affine)
    _expect(
        "has shape 3×4×3 but the diffusion series has 3×4×2",
        tmp_path / "small.nii.gz",
        read_dwi,
        *paths.values(),
        tmp_path / "small.nii.gz",
    )
    write_dwi(tmp_path / "fourd.nii.gz", np.ones((3, 4, 2, 2)), affine)
    _expect("a mask must be 3D", tmp_path / "fourd.nii.gz", read_mask, tmp_path / "fourd.nii.gz")


def test_unreadable_files(tmp_path):
    paths, *_ = _scan(tmp_path, shape=(8, 8, 4))
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _expect(
        "is empty",
        tmp_path / "empty.nii.gz",
        read_dwi,
        tmp_path / "empty.nii.gz",
        paths["bvals"],
        paths["bvecs"],
    )
    _expect(
        "no such file",
        tmp_path / "absent.nii",
        read_dwi,
        tmp_path / "absent.nii",
        paths["bvals"],
        paths["bvecs"],
    )
    (tmp_path / "junk.nii").write_bytes(b"not an image at all" * 40)
    _expect("not a readable NIfTI image", tmp_path / "junk.nii", read_map, tmp_path / "junk.nii")
    for name in ("dwi.nii.gz", "plain.nii"):
        source = (
            paths["dwi"]
            if name == "dwi.nii.gz"
            else write_dwi(tmp_path / name, np.ones((8, 8, 4, 7)), np.eye(4))
        )
        content = source.read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(content[: len(content) // 2])
        _expect("not a readable NIfTI image", cut, read_dwi, cut, paths["bvals"], paths["bvecs"])


def test_writers_validate_and_leave_nothing_behind(tmp_path):
    affine = np.eye(4)
    data = np.ones((2, 2, 2, 3))
    data[0, 0, 0, 1] = np.nan
    _expect("NaN or Inf", tmp_path / "dwi.nii.gz", write_dwi, tmp_path / "dwi.nii.gz", data, affine)
    _expect("must be 4D", tmp_path / "dwi.nii.gz", write_dwi, tmp_path / "dwi.nii.gz", data[..., 0], affine)
    _expect("must be 3D", tmp_path / "m.nii.gz", write_map, tmp_path / "m.nii.gz", data, affine)
    _expect("4×4", tmp_path / "m.nii.gz", write_map, tmp_path / "m.nii.gz", np.ones((2, 2, 2)), np.eye(3))
    _expect(
        "float32 range",
        tmp_path / "m.nii.gz",
        write_map,
        tmp_path / "m.nii.gz",
        np.full((2, 2, 2), 1e300),
        affine,
    )
    _expect(".nii or .nii.gz", tmp_path / "m.img", write_map, tmp_path / "m.img", np.ones((2, 2, 2)), affine)
    assert list(tmp_path.iterdir()) == []


def test_writer_failing_mid_way_leaves_no_file(tmp_path, monkeypatch):
    import nibabel as nib

    def half_write(img, filename):
        Path(filename).write_bytes(b"\x1f\x8b partial")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", half_write)
    with pytest.raises(OSError, match="disk full"):
        write_dwi(tmp_path / "dwi.nii.gz", np.ones((2, 2, 2, 3)), np.eye(4))
    assert list(tmp_path.iterdir()) == []


def test_existing_file_survives_a_rejected_write(tmp_path):
    target = write_map(tmp_path / "fa.nii.gz", np.full((2, 2, 2), 0.5), np.eye(4))
    with pytest.raises(InputError):
        write_map(target, np.full((2, 2, 2), np.inf), np.eye(4))
    np.testing.assert_allclose(read_map(target)[0], 0.5)
