"""``bioinverse cryoem density`` and ``bioinverse cryoem implicit fit | render`` end to end."""

from pathlib import Path

import numpy as np
import pytest

from bioinverse.cli import main
from bioinverse.cryoem.density import atoms_to_map
from bioinverse.cryoem.implicit import load_implicit
from bioinverse.cryoem.io import read_atoms, read_map, read_map_origin, read_stack, write_map
from bioinverse.fourier import fsc

MODEL = Path(__file__).parent / "data" / "helix8.pdb"
FAST = ["--hidden", "32", "--layers", "2", "--steps", "60", "--batch-size", "2048"]


def run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    code = exc.value.code if isinstance(exc.value.code, int) else (0 if exc.value.code is None else 1)
    return code, captured.out, captured.err


def assert_user_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_density_writes_the_model_map(tmp_path, capsys):
    out = tmp_path / "helix.mrc"
    code, stdout, _ = run(["cryoem", "density", MODEL, "--out", out, "--box", 24, "--apix", 2.0], capsys)
    assert code == 0 and "24³ box" in stdout
    volume, voxel = read_map(out)
    assert voxel == pytest.approx(2.0)
    np.testing.assert_allclose(volume, atoms_to_map(read_atoms(MODEL), 24, 2.0), rtol=1e-6, atol=1e-8)


def test_fit_then_render_on_the_same_and_on_a_finer_grid(tmp_path, capsys):
    volume = atoms_to_map(read_atoms(MODEL), 24, 2.0)
    map_path = tmp_path / "helix.mrc"
    write_map(map_path, volume, 2.0, origin=(-24.0, -24.0, -24.0))
    model_path = tmp_path / "helix.pt"
    plot = tmp_path / "fsc.png"
    code, stdout, err = run(["cryoem", "implicit", "fit", map_path, "--out", model_path, *FAST, "--plot", plot],
                            capsys)
    assert code == 0, err
    assert "compression ratio" in stdout and "Nyquist 4.00 Å" in stdout
    assert plot.stat().st_size > 0 and not model_path.with_name("helix.pt.ckpt").exists()
    reported = float(stdout.split("(FSC 0.5): ")[1].split(" Å")[0])

    same = tmp_path / "same.mrc"
    code, _, err = run(["cryoem", "implicit", "render", model_path, "--out", same], capsys)
    assert code == 0, err
    rendered, voxel = read_map(same)
    assert rendered.shape == (24, 24, 24) and voxel == pytest.approx(2.0)
    assert read_map_origin(same) == pytest.approx((-24.0, -24.0, -24.0))
    assert fsc(rendered, volume, 2.0).resolution(0.5) == pytest.approx(reported, abs=0.01)

    fine = tmp_path / "fine.mrc"
    code, _, err = run(["cryoem", "implicit", "render", model_path, "--out", fine, "--apix", 1.0], capsys)
    assert code == 0, err
    upsampled, voxel = read_map(fine)
    assert upsampled.shape == (48, 48, 48) and voxel == pytest.approx(1.0)
    assert read_map_origin(fine) == pytest.approx((-24.0, -24.0, -24.0))  # voxel 2i over voxel i
    np.testing.assert_allclose(upsampled[::2, ::2, ::2], rendered, atol=1e-5 * np.abs(rendered).max())

    sub = tmp_path / "sub.mrc"
    code, _, err = run(["cryoem", "implicit", "render", model_path, "--out", sub, "--box", 8,
                        "--shift", "4,0,-2"], capsys)
    assert code == 0, err
    part, _ = read_map(sub)
    # Centre voxel 4 of the sub-volume is 4 Å = 2 voxels along x and 1 voxel back along z.
    np.testing.assert_allclose(part[4, 4, 4], rendered[12 - 1, 12, 12 + 2], atol=1e-6 * np.abs(rendered).max())


def test_fit_a_central_slice_and_render_it_as_an_image(tmp_path, capsys):
    volume = atoms_to_map(read_atoms(MODEL), 24, 2.0)
    map_path = tmp_path / "helix.mrc"
    write_map(map_path, volume, 2.0)
    model_path = tmp_path / "slice.pt"
    code, stdout, err = run(["cryoem", "implicit", "fit", map_path, "--out", model_path, "--slice", "z", *FAST],
                            capsys)
    assert code == 0, err
    assert "central z slice" in stdout and "(FRC 0.5)" in stdout
    assert load_implicit(model_path).dimensions == 2
    image_path = tmp_path / "slice.mrc"
    code, _, err = run(["cryoem", "implicit", "render", model_path, "--out", image_path], capsys)
    assert code == 0, err
    images, pixel = read_stack(image_path)
    assert images.shape == (1, 24, 24) and pixel == pytest.approx(2.0)


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    volume = atoms_to_map(read_atoms(MODEL), 16, 2.0)
    map_path = tmp_path / "m.mrc"
    write_map(map_path, volume, 2.0)
    code, _, err = run(["cryoem", "implicit", "fit", map_path, "--out", tmp_path / "x.pt", "--network", "relu"],
                       capsys)
    assert_user_error(code, err, "kind", "siren, fourier")
    code, _, err = run(["cryoem", "implicit", "fit", map_path, "--out", tmp_path / "x.pt", "--slice", "w"], capsys)
    assert_user_error(code, err, "slice")
    code, _, err = run(["cryoem", "implicit", "fit", tmp_path / "none.mrc", "--out", tmp_path / "x.pt"], capsys)
    assert_user_error(code, err, "none.mrc", "no such file")
    code, _, err = run(["cryoem", "implicit", "render", map_path, "--out", tmp_path / "r.mrc"], capsys)
    assert_user_error(code, err, "m.mrc", "model")
    model_path = tmp_path / "m.pt"
    assert run(["cryoem", "implicit", "fit", map_path, "--out", model_path, *FAST, "--steps", "2"], capsys)[0] == 0
    code, _, err = run(["cryoem", "implicit", "render", model_path, "--out", tmp_path / "r.mrc", "--shift", "1,2"],
                       capsys)
    assert_user_error(code, err, "--shift")
    code, _, err = run(["cryoem", "density", tmp_path / "none.pdb", "--out", tmp_path / "d.mrc"], capsys)
    assert_user_error(code, err, "none.pdb")
