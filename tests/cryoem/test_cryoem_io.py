import gzip
import shutil
import subprocess
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest
import starfile

from bioinverse.cli import main
from bioinverse.cryoem.io import (
    Atoms,
    Particles,
    read_atoms,
    read_map,
    read_particle_stack,
    read_particles,
    read_stack,
    read_stack_images,
    write_map,
    write_particles,
    write_stack,
)
from bioinverse.errors import InputError


def test_roundtrip(tmp_path):
    data = np.random.default_rng(0).standard_normal((8, 8, 8)).astype(np.float32)
    write_map(tmp_path / "m.mrc", data, 1.5)
    back, px = read_map(tmp_path / "m.mrc")
    np.testing.assert_array_equal(back, data)
    assert px == pytest.approx(1.5)


def test_truncated_and_empty_files(tmp_path):
    data = np.zeros((16, 16, 16), np.float32)
    write_map(tmp_path / "m.mrc", data, 1.0)
    raw = (tmp_path / "m.mrc").read_bytes()
    (tmp_path / "cut.mrc").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "empty.mrc").write_bytes(b"")
    (tmp_path / "junk.mrc").write_bytes(b"not a map" * 200)
    with pytest.raises(InputError, match="not a valid MRC"):
        read_map(tmp_path / "cut.mrc")
    with pytest.raises(InputError, match="is empty"):
        read_map(tmp_path / "empty.mrc")
    with pytest.raises(InputError, match="not a valid MRC"):
        read_map(tmp_path / "junk.mrc")


def test_nan_and_missing_voxel_size(tmp_path):
    data = np.zeros((4, 4, 4), np.float32)
    data[0, 0, 0] = np.nan
    with pytest.warns(RuntimeWarning, match="NaN"):  # mrcfile itself warns when writing it
        write_map(tmp_path / "nan.mrc", data, 1.0)
    with pytest.raises(InputError, match="NaN"):
        read_map(tmp_path / "nan.mrc")
    write_map(tmp_path / "nopx.mrc", np.zeros((4, 4, 4), np.float32), 0.0)
    with pytest.raises(InputError, match="voxel size"):
        read_map(tmp_path / "nopx.mrc")


def test_fsc_command(tmp_path, capsys):
    rng = np.random.default_rng(1)
    signal = rng.standard_normal((32, 32, 32))
    write_map(tmp_path / "h1.mrc", signal, 2.0)
    write_map(tmp_path / "h2.mrc", signal, 2.0)
    with pytest.raises(SystemExit) as exc:
        main(["cryoem", "fsc", str(tmp_path / "h1.mrc"), str(tmp_path / "h2.mrc"), "--plot", str(tmp_path / "fsc.png")])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert "resolution (FSC 0.143): 4.00 Å" in out  # identical maps: Nyquist, 2 × 2 Å
    assert (tmp_path / "fsc.png").read_bytes().startswith(b"\x89PNG")


def test_fsc_command_shape_mismatch(tmp_path, capsys):
    write_map(tmp_path / "a.mrc", np.zeros((8, 8, 8), np.float32), 1.0)
    write_map(tmp_path / "b.mrc", np.zeros((16, 16, 16), np.float32), 1.0)
    with pytest.raises(SystemExit) as exc:
        main(["cryoem", "fsc", str(tmp_path / "a.mrc"), str(tmp_path / "b.mrc")])
    assert exc.value.code == 2
    assert "has shape (16, 16, 16)" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Stacks

DATA = Path(__file__).parent / "data"
needs_relion = pytest.mark.skipif(
    shutil.which("relion_refine") is None or shutil.which("relion_stack_create") is None,
    reason="RELION is not installed",
)


def _raw_mrc(path, data, voxel_size, stack=False):
    """An MRC file written without our writer's checks (to hold deliberately bad content)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns about NaN
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(np.asarray(data, dtype=np.float32))
            if stack:
                mrc.set_image_stack()
            mrc.voxel_size = voxel_size


def test_stack_roundtrip_and_header(tmp_path):
    images = np.random.default_rng(2).standard_normal((5, 12, 12)).astype(np.float32)
    write_stack(tmp_path / "s.mrcs", images, 1.25)
    back, px = read_stack(tmp_path / "s.mrcs")
    np.testing.assert_array_equal(back, images)
    assert px == pytest.approx(1.25)
    with mrcfile.open(tmp_path / "s.mrcs") as mrc:  # RELION's image-stack convention
        assert mrc.is_image_stack() and int(mrc.header.ispg) == 0 and int(mrc.header.mz) == 1
        assert int(mrc.header.nz) == 5


def test_single_image_is_a_stack_of_one(tmp_path):
    image = np.arange(64.0).reshape(8, 8)
    write_stack(tmp_path / "one.mrcs", image, 2.0)
    _raw_mrc(tmp_path / "plain.mrc", image, 2.0)  # a 2-D MRC file
    for name in ("one.mrcs", "plain.mrc"):
        back, px = read_stack(tmp_path / name)
        assert back.shape == (1, 8, 8) and px == 2.0
        np.testing.assert_array_equal(back[0], image)
        np.testing.assert_array_equal(read_stack_images(tmp_path / name, [0, 0])[1], image)


def test_stack_rejections(tmp_path):
    write_stack(tmp_path / "ok.mrcs", np.zeros((4, 16, 16)), 1.0)
    raw = (tmp_path / "ok.mrcs").read_bytes()
    (tmp_path / "cut.mrcs").write_bytes(raw[: len(raw) - 100])
    (tmp_path / "empty.mrcs").write_bytes(b"")
    (tmp_path / "junk.mrcs").write_bytes(b"not an image" * 200)
    _raw_mrc(tmp_path / "rect.mrcs", np.zeros((2, 8, 10)), 1.0, stack=True)
    nan = np.zeros((2, 8, 8))
    nan[1, 3, 3] = np.nan
    _raw_mrc(tmp_path / "nan.mrcs", nan, 1.0, stack=True)
    _raw_mrc(tmp_path / "nopx.mrcs", np.zeros((2, 8, 8)), 0.0, stack=True)
    _raw_mrc(tmp_path / "aniso.mrcs", np.zeros((2, 8, 8)), (1.0, 1.2, 1.0), stack=True)
    cases = {"missing.mrcs": "no such file", "empty.mrcs": "is empty", "cut.mrcs": "not a valid MRC",
             "junk.mrcs": "not a valid MRC", "rect.mrcs": "non-square 10×8", "nan.mrcs": "NaN",
             "nopx.mrcs": "no pixel size", "aniso.mrcs": "anisotropic"}
    for name, message in cases.items():
        with pytest.raises(InputError, match=message) as exc:
            read_stack(tmp_path / name)
        assert name in str(exc.value)  # the message names the file
    for name in ("cut.mrcs", "rect.mrcs"):
        with pytest.raises(InputError, match="not a valid MRC|non-square"):
            read_stack_images(tmp_path / name, [0])
    with pytest.raises(InputError, match="images"):
        write_stack(tmp_path / "w.mrcs", np.zeros((2, 8, 6)), 1.0)
    with pytest.raises(InputError, match="pixel_size"):
        write_stack(tmp_path / "w.mrcs", np.zeros((2, 8, 8)), 0.0)
    assert not (tmp_path / "w.mrcs").exists()


def test_read_stack_images_selects_through_mmap(tmp_path):
    images = np.random.default_rng(3).standard_normal((6, 8, 8)).astype(np.float32)
    images[4, 0, 0] = np.nan
    _raw_mrc(tmp_path / "s.mrcs", images, 1.0, stack=True)
    picked = read_stack_images(tmp_path / "s.mrcs", [5, 0, 2, 0])
    np.testing.assert_array_equal(picked, images[[5, 0, 2, 0]])  # image 4 (NaN) is never read
    assert picked.dtype == np.float32
    assert read_stack_images(tmp_path / "s.mrcs", np.array([], dtype=int)).shape == (0, 8, 8)
    with pytest.raises(InputError, match="has 6 images; image index 6"):
        read_stack_images(tmp_path / "s.mrcs", [1, 6])
    with pytest.raises(InputError, match="index -1"):
        read_stack_images(tmp_path / "s.mrcs", [-1])
    with pytest.raises(InputError, match="NaN"):
        read_stack_images(tmp_path / "s.mrcs", [4])
    with pytest.raises(InputError, match="integers"):
        read_stack_images(tmp_path / "s.mrcs", [0.5])


# --------------------------------------------------------------------------------------------------
# Particle STAR files


def _particles(n=7, groups=3, stack="stack.mrcs", seed=0, **extra):
    rng = np.random.default_rng(seed)
    defaults = {
        "image_names": [f"{k + 1:06d}@{stack}" for k in range(n)],
        "angles": rng.uniform(-180, 180, (n, 3)),
        "origins": rng.uniform(-3, 3, (n, 2)),
        "defocus_u": rng.uniform(8000, 25000, n),
        "defocus_v": rng.uniform(8000, 25000, n),
        "defocus_angle": rng.uniform(-90, 90, n),
        "optics_group": (np.arange(n) % groups) + 1,
        "voltage": [300.0, 200.0, 300.0][:groups],
        "spherical_aberration": [2.7, 2.0, 0.01][:groups],
        "amplitude_contrast": [0.1, 0.07, 0.1][:groups],
        "pixel_size": [1.25] * groups,
        "image_size": [16] * groups,
        "optics_group_names": [f"grid{g}" for g in range(groups)],
        "random_subset": (np.arange(n) % 2) + 1,
        "micrograph_names": [f"mics/m{k % 2}.mrc" for k in range(n)],
        "log_likelihood": rng.uniform(1e3, 2e3, n),
        "max_probability": rng.uniform(0, 1, n),
    }
    defaults.update(extra)
    return Particles(**defaults)


def _assert_same(a, b):
    assert a.image_names == b.image_names and a.micrograph_names == b.micrograph_names
    assert a.optics_group_names == b.optics_group_names
    for field in ("angles", "origins", "defocus_u", "defocus_v", "defocus_angle", "voltage", "spherical_aberration",
                  "amplitude_contrast", "pixel_size", "original_pixel_size", "log_likelihood", "max_probability"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-6, err_msg=field)
    for field in ("optics_group", "random_subset", "image_size"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_star_roundtrip_several_optics_groups(tmp_path):
    particles = _particles()
    write_particles(tmp_path / "p.star", particles)
    back = read_particles(tmp_path / "p.star")
    _assert_same(particles, back)
    assert back.has_poses and back.star_path == tmp_path / "p.star" and len(back) == 7
    assert back.n_optics_groups == 3
    blocks = starfile.read(tmp_path / "p.star", always_dict=True)
    assert list(blocks) == ["optics", "particles"]
    assert list(blocks["optics"].columns) == [
        "rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage",
        "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
        "rlnImageDimensionality"]
    assert list(blocks["particles"].columns)[:14] == [
        "rlnImageName", "rlnMicrographName", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
        "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor", "rlnPhaseShift",
        "rlnOpticsGroup", "rlnRandomSubset"]
    assert (tmp_path / "p.star").read_text().startswith("# version 30001\n")
    # per-particle views of the optics table
    ctf = back.ctf_parameters()
    np.testing.assert_array_equal(ctf.voltage, [300.0, 200.0, 300.0, 300.0, 200.0, 300.0, 300.0])
    np.testing.assert_array_equal(ctf.spherical_aberration[:3], [2.7, 2.0, 0.01])
    np.testing.assert_array_equal(back.per_particle("image_size"), np.full(7, 16))
    # subsets keep the optics table and pick per-particle rows
    sub = back.subset(back.optics_group == 2)
    assert sub.image_names == ["000002@stack.mrcs", "000005@stack.mrcs"] and sub.n_optics_groups == 3
    np.testing.assert_array_equal(sub.defocus_u, back.defocus_u[[1, 4]])
    assert back.subset([6, 0]).micrograph_names == ["mics/m0.mrc", "mics/m0.mrc"]
    with pytest.raises(InputError, match="mask"):
        back.subset([True, False])


def test_star_minimal_particles_without_poses(tmp_path):
    particles = _particles(n=3, groups=1, optics_group_names=None, random_subset=None, micrograph_names=None,
                           log_likelihood=None, max_probability=None, angles=np.zeros((3, 3)),
                           origins=np.zeros((3, 2)), has_poses=False)
    write_particles(tmp_path / "p.star", particles)
    table = starfile.read(tmp_path / "p.star", always_dict=True)["particles"]
    assert "rlnAngleRot" not in table.columns and "rlnRandomSubset" not in table.columns
    assert set(table["rlnMicrographName"]) == {"mic.mrc"}
    back = read_particles(tmp_path / "p.star")
    assert not back.has_poses and back.log_likelihood is None and back.optics_group_names == ["opticsGroup1"]
    assert (back.random_subset == 0).all()


def test_stack_locations_resolve_against_the_star_folder(tmp_path, monkeypatch):
    (tmp_path / "job" / "Extract").mkdir(parents=True)
    write_stack(tmp_path / "job" / "Extract" / "a.mrcs", np.zeros((2, 4, 4)), 1.0)
    particles = _particles(n=2, groups=1, image_names=["000002@Extract/a.mrcs", "000001@/abs/b.mrcs"])
    write_particles(tmp_path / "job" / "p.star", particles)
    monkeypatch.chdir(tmp_path)  # the working directory is not the STAR file's folder
    locations = read_particles(Path("job") / "p.star").stack_locations()
    assert locations == [(1, Path("job") / "Extract" / "a.mrcs"), (0, Path("/abs/b.mrcs"))]
    # a RELION project layout: the name is relative to the working directory (the project)
    (tmp_path / "Refine3D").mkdir()
    write_particles(tmp_path / "Refine3D" / "p.star", _particles(n=1, groups=1, image_names=["000001@job/Extract/a.mrcs"]))
    assert read_particles("Refine3D/p.star").stack_locations() == [(0, Path("job/Extract/a.mrcs"))]


def _edit_star(source, target, optics=None, particles=None, drop=()):
    """Write a modified copy of a STAR file; optics/particles map column → new values."""
    blocks = starfile.read(source, always_dict=True)
    for name, changes in (("optics", optics), ("particles", particles)):
        for column, values in (changes or {}).items():
            blocks[name][column] = values
    for name in drop:
        if name in blocks:
            del blocks[name]
        else:
            blocks = {key: block.drop(columns=[name], errors="ignore") for key, block in blocks.items()}
    starfile.write(blocks, target, overwrite=True)
    return target


def test_star_rejections(tmp_path):
    good = tmp_path / "good.star"
    write_particles(good, _particles())
    n = 7

    def expect(path, message):
        with pytest.raises(InputError, match=message) as exc:
            read_particles(path)
        assert str(path) in str(exc.value)

    expect(tmp_path / "missing.star", "no such file")
    (tmp_path / "empty.star").write_text("")
    expect(tmp_path / "empty.star", "is empty")
    (tmp_path / "broken.star").write_text("data_particles\n\nloop_\n_rlnA #1\n_rlnB #2\n1 2\n3 4 5 6\n")
    expect(tmp_path / "broken.star", "not a valid STAR file")
    expect(_edit_star(good, tmp_path / "nopart.star", drop=["particles"]), "no data_particles")
    expect(_edit_star(good, tmp_path / "noopt.star", drop=["optics"]), "no data_optics")
    expect(_edit_star(good, tmp_path / "cols.star", drop=["rlnDefocusV", "rlnImageName"]),
           "lacks the column.s. rlnImageName, rlnDefocusV")
    expect(_edit_star(good, tmp_path / "optcols.star", drop=["rlnImagePixelSize"]),
           "data_optics lacks the column.s. rlnImagePixelSize")
    expect(_edit_star(good, tmp_path / "angle.star", drop=["rlnAngleTilt"]), "lacks rlnAngleTilt")
    expect(_edit_star(good, tmp_path / "nan.star", particles={"rlnDefocusU": [np.nan] + [1e4] * (n - 1)}),
           "rlnDefocusU of row 1 .* not a number")
    expect(_edit_star(good, tmp_path / "text.star", particles={"rlnAngleRot": ["abc"] + [1.0] * (n - 1)}),
           "rlnAngleRot of row 1 is 'abc'")
    expect(_edit_star(good, tmp_path / "defocus.star", particles={"rlnDefocusV": [1e4] * (n - 1) + [-5.0]}),
           "rlnDefocusV must be positive.*particle 7")
    expect(_edit_star(good, tmp_path / "group.star", particles={"rlnOpticsGroup": [1] * (n - 1) + [4]}),
           "particle 7 is in optics group 4, which the optics table .groups 1 … 3. does not define")
    expect(_edit_star(good, tmp_path / "px.star", optics={"rlnImagePixelSize": [1.25, 0.0, 1.25]}),
           "rlnImagePixelSize must be positive")
    expect(_edit_star(good, tmp_path / "numbers.star", optics={"rlnOpticsGroup": [1, 2, 5]}),
           "numbers its groups")
    expect(_edit_star(good, tmp_path / "subset.star", particles={"rlnRandomSubset": [1, 2, 3, 1, 2, 1, 2]}),
           "rlnRandomSubset must be 1 or 2")


RELION30 = """
data_

loop_
_rlnImageName #1
_rlnMicrographName #2
_rlnDefocusU #3
_rlnDefocusV #4
_rlnDefocusAngle #5
_rlnVoltage #6
_rlnSphericalAberration #7
_rlnAmplitudeContrast #8
_rlnMagnification #9
_rlnDetectorPixelSize #10
_rlnOriginX #11
_rlnOriginY #12
_rlnAngleRot #13
_rlnAngleTilt #14
_rlnAnglePsi #15
000001@s.mrcs m.mrc 10000.0 9000.0 10.0 300.0 2.7 0.1 50000.0 6.25 2.0 -1.0 10.0 20.0 30.0
000002@s.mrcs m.mrc 11000.0 9500.0 20.0 200.0 2.7 0.1 50000.0 6.25 0.5 0.0 11.0 21.0 31.0
000003@s.mrcs m.mrc 12000.0 9900.0 30.0 300.0 2.7 0.1 50000.0 6.25 0.0 1.0 12.0 22.0 32.0
"""


def test_relion30_star_without_optics_table(tmp_path):
    write_stack(tmp_path / "s.mrcs", np.zeros((3, 10, 10)), 1.25)
    (tmp_path / "old.star").write_text(RELION30)
    p = read_particles(tmp_path / "old.star")
    assert p.n_optics_groups == 2  # 300 kV and 200 kV
    np.testing.assert_array_equal(p.optics_group, [1, 2, 1])
    np.testing.assert_array_equal(p.voltage, [300.0, 200.0])
    np.testing.assert_allclose(p.pixel_size, [1.25, 1.25])  # 6.25 µm × 10⁴ / 50 000
    np.testing.assert_array_equal(p.image_size, [10, 10])  # from the stack header
    np.testing.assert_allclose(p.origins, [[2.5, -1.25], [0.625, 0.0], [0.0, 1.25]])  # pixels → Å
    np.testing.assert_array_equal(p.angles[2], [12.0, 22.0, 32.0])
    images, _ = read_particle_stack(tmp_path / "old.star")
    assert images.shape == (3, 10, 10)
    (tmp_path / "nopx.star").write_text(RELION30.replace("_rlnMagnification #9", "_rlnSomething #9"))
    with pytest.raises(InputError, match="no pixel size"):
        read_particles(tmp_path / "nopx.star")
    (tmp_path / "novolt.star").write_text(RELION30.replace("_rlnVoltage #6", "_rlnOther #6"))
    with pytest.raises(InputError, match="lacks the column.s. rlnVoltage"):
        read_particles(tmp_path / "novolt.star")


def test_read_particle_stack_from_several_stacks(tmp_path):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((4, 16, 16)).astype(np.float32)
    b = rng.standard_normal((2, 16, 16)).astype(np.float32)
    write_stack(tmp_path / "a.mrcs", a, 1.25)
    write_stack(tmp_path / "b.mrcs", b, 1.25)
    names = ["000003@a.mrcs", "000002@b.mrcs", "000001@a.mrcs", "000004@a.mrcs", "000001@b.mrcs"]
    write_particles(tmp_path / "p.star", _particles(n=5, groups=2, image_names=names))
    images, particles = read_particle_stack(tmp_path / "p.star")
    np.testing.assert_array_equal(images, np.stack([a[2], b[1], a[0], a[3], b[0]]))
    assert particles.image_names == names


def test_read_particle_stack_rejections(tmp_path):
    write_stack(tmp_path / "a.mrcs", np.zeros((3, 16, 16)), 1.25)
    write_stack(tmp_path / "small.mrcs", np.zeros((3, 8, 8)), 1.25)
    write_stack(tmp_path / "px1.mrcs", np.zeros((3, 16, 16)), 1.0)
    _raw_mrc(tmp_path / "px0.mrcs", np.ones((3, 16, 16)), 0.0, stack=True)

    def star(name, image_names, **extra):
        path = tmp_path / name
        write_particles(path, _particles(n=len(image_names), groups=1, image_names=image_names, **extra))
        return path

    cases = [
        (["000001@a.mrcs", "000001@gone.mrcs"], "references the stack .*gone.mrcs, which does not exist"),
        (["000001@a.mrcs", "000004@a.mrcs"], "'000004@a.mrcs' .particle 2. is beyond the 3 images"),
        (["000000@a.mrcs"], "needs a 1-based index"),
        (["000001@small.mrcs"], "has 8×8 px images but .* gives rlnImageSize 16"),
        (["000001@px1.mrcs"], "has pixel size 1 Å in its header but .* gives rlnImagePixelSize 1.25 Å"),
    ]
    for k, (image_names, message) in enumerate(cases):
        with pytest.raises(InputError, match=message):
            read_particle_stack(star(f"c{k}.star", image_names))
    images, _ = read_particle_stack(star("px0.star", ["000002@px0.mrcs"]))  # unset header pixel size: accepted
    assert images.shape == (1, 16, 16) and images.max() == 1.0
    mixed = _particles(n=2, groups=2, image_names=["000001@a.mrcs", "000002@a.mrcs"], image_size=[16, 32])
    write_particles(tmp_path / "mixed.star", mixed)
    with pytest.raises(InputError, match="mixes particles of image sizes .16, 32."):
        read_particle_stack(tmp_path / "mixed.star")


def test_particles_constructor_checks():
    with pytest.raises(InputError, match="angles .* has shape"):
        _particles(angles=np.zeros((3, 3)))
    with pytest.raises(InputError, match="rlnDefocusU must be positive"):
        _particles(defocus_u=np.zeros(7))
    with pytest.raises(InputError, match="set for some particles"):
        _particles(random_subset=[0, 1, 2, 1, 2, 1, 2])
    with pytest.raises(InputError, match="rlnAmplitudeContrast must lie in"):
        _particles(amplitude_contrast=[0.1, 1.5, 0.1])
    with pytest.raises(InputError, match="name"):
        _particles().per_particle("defocus")


@needs_relion
def test_relion_reads_our_star_and_stacks(tmp_path):
    rng = np.random.default_rng(11)
    images = rng.standard_normal((6, 16, 16)).astype(np.float32)
    write_stack(tmp_path / "a.mrcs", images[:4], 1.25)
    write_stack(tmp_path / "b.mrcs", images[4:], 1.25)
    names = ["000001@a.mrcs", "000002@a.mrcs", "000003@a.mrcs", "000004@a.mrcs", "000001@b.mrcs", "000002@b.mrcs"]
    particles = _particles(n=6, groups=2, image_names=names, log_likelihood=None, max_probability=None)
    write_particles(tmp_path / "p.star", particles)
    # relion_stack_create reads every image through the STAR file and copies it into one stack
    run = subprocess.run(["relion_stack_create", "--i", "p.star", "--o", "copy"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    np.testing.assert_allclose(read_stack_images(tmp_path / "copy.mrcs", range(6)), images, atol=1e-6)
    relion_copy = read_particles(tmp_path / "copy.star")
    np.testing.assert_allclose(relion_copy.defocus_u, particles.defocus_u, atol=1e-5)
    np.testing.assert_array_equal(relion_copy.optics_group, particles.optics_group)
    images_back, _ = read_particle_stack(tmp_path / "copy.star")
    np.testing.assert_allclose(images_back, images, atol=1e-6)
    # relion_refine accepts the file as input (one iteration of 2-D classification)
    (tmp_path / "c2d").mkdir()
    run = subprocess.run(["relion_refine", "--i", "p.star", "--o", "c2d/run", "--K", "1", "--iter", "1",
                          "--particle_diameter", "15", "--tau2_fudge", "2", "--psi_step", "30", "--offset_range", "2",
                          "--offset_step", "1", "--dont_check_norm", "--zero_mask", "--j", "1"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    refined = read_particles(tmp_path / "c2d" / "run_it001_data.star")
    assert sorted(refined.image_names) == sorted(names) and refined.log_likelihood is not None
    order = [refined.image_names.index(name) for name in names]  # RELION groups the output by half set
    np.testing.assert_array_equal(refined.random_subset[order], particles.random_subset)
    np.testing.assert_allclose(refined.defocus_v[order], particles.defocus_v, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Atomic models


def test_read_atoms_pdb(tmp_path):
    atoms = read_atoms(DATA / "helix8.pdb")
    assert len(atoms) == 50  # 52 records less 2 waters
    np.testing.assert_allclose(atoms.positions[0], [22.550, 24.000, 26.100], atol=1e-3)
    assert atoms.b_factors[0] == pytest.approx(32.94, abs=1e-3)
    counts = dict(zip(*np.unique(atoms.elements, return_counts=True)))
    assert counts == {"C": 24, "N": 8, "O": 8, "H": 8, "S": 1, "FE": 1}
    assert atoms.occupancies[atoms.elements == "FE"][0] == pytest.approx(0.8)
    assert atoms.name.endswith("helix8.pdb")
    assert len(read_atoms(DATA / "helix8.pdb", keep_waters=True)) == 52


def test_read_atoms_formats_agree(tmp_path):
    import gemmi

    reference = read_atoms(DATA / "helix8.pdb")
    structure = gemmi.read_structure(str(DATA / "helix8.pdb"))
    structure.setup_entities()
    structure.make_mmcif_document().write_file(str(tmp_path / "m.cif"))
    for source, target in (("helix8.pdb", "m.pdb.gz"), (tmp_path / "m.cif", "m.cif.gz")):
        with gzip.open(tmp_path / target, "wb") as out:
            out.write((DATA / source).read_bytes())
    for name in ("m.cif", "m.pdb.gz", "m.cif.gz"):
        atoms = read_atoms(tmp_path / name)
        np.testing.assert_allclose(atoms.positions, reference.positions, atol=1e-3)
        np.testing.assert_array_equal(atoms.elements, reference.elements)
        np.testing.assert_allclose(atoms.b_factors, reference.b_factors, atol=1e-2)


def test_read_atoms_first_model_only(tmp_path):
    line = "ATOM      1  CA  GLY A   1    {:8.3f}   0.000   0.000  1.00 10.00           C\n"
    text = "MODEL        1\n" + line.format(1.0) + "ENDMDL\nMODEL        2\n" + line.format(7.0) + line.format(8.0)
    (tmp_path / "nmr.pdb").write_text(text + "ENDMDL\nEND\n")
    atoms = read_atoms(tmp_path / "nmr.pdb")
    assert len(atoms) == 1 and atoms.positions[0, 0] == pytest.approx(1.0)


def test_read_atoms_rejections(tmp_path):
    (tmp_path / "empty.pdb").write_text("")
    (tmp_path / "junk.pdb").write_bytes(b"\x00\x01garbage\n" * 20)
    (tmp_path / "water.pdb").write_text(
        "HETATM    1  O   HOH A   1       1.000   2.000   3.000  1.00 30.00           O\nEND\n")
    cases = {"missing.pdb": "no such file", "empty.pdb": "is empty", "junk.pdb": "contains no atoms",
             "water.pdb": "contains only waters"}
    for name, message in cases.items():
        with pytest.raises(InputError, match=message) as exc:
            read_atoms(tmp_path / name)
        assert name in str(exc.value)
    with pytest.raises(InputError, match="occupancies"):
        Atoms([[0.0, 0.0, 0.0]], ["C"], occupancies=[1.5])
    with pytest.raises(InputError, match="positions"):
        Atoms([[0.0, np.nan, 0.0]], ["C"])


def test_star_single_optics_group_as_key_value_block(tmp_path):
    """One optics group may be written as key-value pairs, and particles may then omit rlnOpticsGroup."""
    (tmp_path / "kv.star").write_text(
        "data_optics\n\n_rlnOpticsGroup 1\n_rlnVoltage 300\n_rlnSphericalAberration 2.7\n"
        "_rlnAmplitudeContrast 0.1\n_rlnImagePixelSize 1.0\n_rlnImageSize 16\n\n"
        "data_particles\n\nloop_\n_rlnImageName #1\n_rlnDefocusU #2\n_rlnDefocusV #3\n_rlnDefocusAngle #4\n"
        "000001@a.mrcs 10000 9000 10\n000002@a.mrcs 11000 9000 10\n")
    particles = read_particles(tmp_path / "kv.star")
    np.testing.assert_array_equal(particles.optics_group, [1, 1])
    assert particles.voltage.tolist() == [300.0] and not particles.has_poses


def test_read_atoms_without_element_columns_takes_polymer_elements_from_names(tmp_path):
    # CHARMM-style records (no columns 77-78): gemmi alone would read CA as calcium and HG1 as mercury.
    lines = [
        "ATOM      1  N   MET     1     -11.921  26.307  10.410  1.00 38.38      4AKE",
        "ATOM      2  CA  MET     1     -10.929  25.652  11.311  1.00 26.14      4AKE",
        "ATOM      3  HG1 MET     1     -10.000  25.000  11.000  1.00  0.00      4AKE",
        "ATOM      4  SD  MET     1      -9.000  24.000  12.000  1.00 20.00      4AKE",
        "ATOM      5  CD  HSD     2      -8.000  23.000  13.000  1.00 20.00      4AKE",
        "HETATM    6 CA   CA      3      -7.000  22.000  14.000  1.00 20.00      4AKE",
    ]
    (tmp_path / "charmm.pdb").write_text("\n".join(lines) + "\nEND\n")
    atoms = read_atoms(tmp_path / "charmm.pdb")
    assert atoms.elements.tolist() == ["N", "C", "H", "S", "C", "CA"]  # the ion stays calcium
