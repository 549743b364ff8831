import numpy as np
import pytest

from bioinverse.cli import main
from bioinverse.dmri.io import read_map


def _run(args):
    try:
        main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    root = tmp_path_factory.mktemp("dmri")
    for seed in (1, 2):
        assert _run(["dmri", "simulate", str(root / f"s{seed}"), "--seed", str(seed), "--shape", "16,18,8",
                     "--snr", "30"]) == 0
    return root


def _files(directory):
    return ["--bvals", str(directory / "dwi.bval"), "--bvecs", str(directory / "dwi.bvec"),
            "--mask", str(directory / "mask.nii.gz")]


def test_fit_writes_dki_maps_close_to_truth(subjects, capsys):
    s = subjects / "s1"
    assert _run(["dmri", "fit", str(s / "dwi.nii.gz"), *_files(s), "--out", str(subjects / "fit")]) == 0
    md, _ = read_map(subjects / "fit" / "md.nii.gz")
    truth, _ = read_map(s / "truth_md.nii.gz")
    tissue, _ = read_map(s / "truth_tissue.nii.gz")
    wm = tissue == 1
    assert np.median(np.abs(md[wm] - truth[wm]) / truth[wm]) < 0.1


def test_train_then_predict_on_another_subject(subjects):
    s1, s2 = subjects / "s1", subjects / "s2"
    model = subjects / "qdl.pt"
    assert _run(["dmri", "train", str(s1 / "dwi.nii.gz"), *_files(s1), "--out", str(model),
                 "--target", f"md={s1 / 'truth_md.nii.gz'}", "--target", f"fa={s1 / 'truth_fa.nii.gz'}",
                 "--n-dwis", "12", "--max-epochs", "40"]) == 0
    out = subjects / "pred"
    assert _run(["dmri", "predict", str(model), str(s2 / "dwi.nii.gz"), *_files(s2), "--out", str(out)]) == 0
    fa, _ = read_map(out / "fa.nii.gz")
    truth, _ = read_map(s2 / "truth_fa.nii.gz")
    mask, _ = read_map(s2 / "mask.nii.gz")
    inside = mask > 0
    assert np.corrcoef(fa[inside], truth[inside])[0, 1] > 0.8


def test_predict_on_a_protocol_without_the_scheme_fails_cleanly(subjects, tmp_path, capsys):
    s1 = subjects / "s1"
    model = tmp_path / "m.pt"
    assert _run(["dmri", "train", str(s1 / "dwi.nii.gz"), *_files(s1), "--out", str(model),
                 "--target", f"md={s1 / 'truth_md.nii.gz'}", "--max-epochs", "12"]) == 0
    other = tmp_path / "noddi"
    assert _run(["dmri", "simulate", str(other), "--protocol", "noddi", "--shape", "8,8,8"]) == 0
    capsys.readouterr()
    code = _run(["dmri", "predict", str(model), str(other / "dwi.nii.gz"), *_files(other), "--out", str(tmp_path / "p")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p" / "md.nii.gz").exists()


def test_bad_inputs_exit_2(subjects, tmp_path, capsys):
    s1 = subjects / "s1"
    assert _run(["dmri", "simulate", str(tmp_path / "x"), "--protocol", "seven-shell"]) == 2
    assert _run(["dmri", "fit", str(s1 / "dwi.nii.gz"), *_files(s1), "--out", str(tmp_path / "f"),
                 "--model", "ball"]) == 2
    assert _run(["dmri", "fit", str(s1 / "truth_md.nii.gz"), *_files(s1), "--out", str(tmp_path / "f")]) == 2
    assert _run(["dmri", "train", str(s1 / "dwi.nii.gz"), *_files(s1), "--out", str(tmp_path / "m.pt"),
                 "--target", "md"]) == 2


def test_segmentation_from_labels(subjects, tmp_path):
    s1, s2 = subjects / "s1", subjects / "s2"
    model = tmp_path / "seg.pt"
    assert _run(["dmri", "train", str(s1 / "dwi.nii.gz"), *_files(s1), "--out", str(model),
                 "--labels", str(s1 / "truth_tissue.nii.gz"), "--max-epochs", "30"]) == 0
    out = tmp_path / "seg"
    assert _run(["dmri", "predict", str(model), str(s2 / "dwi.nii.gz"), *_files(s2), "--out", str(out)]) == 0
    labels, _ = read_map(out / "labels.nii.gz")
    truth, _ = read_map(s2 / "truth_tissue.nii.gz")
    inside = truth > 0
    assert (labels[inside] == truth[inside]).mean() > 0.8
    p_csf, _ = read_map(out / "p_3.nii.gz")
    assert p_csf[truth == 3].mean() > 0.5 > p_csf[truth == 1].mean()
