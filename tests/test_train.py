"""Tests of the shared training loop, bioinverse.train."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from bioinverse.errors import InputError
from bioinverse.train import (
    EarlyStopping,
    PlateauSchedule,
    StagnationSchedule,
    TrainConfig,
    fit,
    select_device,
    seed_everything,
    window_rises,
    window_stagnates,
)


def config(**overrides) -> TrainConfig:
    base = dict(progress=False, batch_size=32, max_epochs=8, early_stopping="none", lr=1e-2)
    base.update(overrides)
    return TrainConfig(**base)


def regression(n=200, d=4, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, 1)).astype(np.float32)
    y = (X @ w + noise * rng.normal(size=(n, 1))).astype(np.float32)
    return X, y


def mlp(seed: int, d=4, hidden=16, out=1, dropout=0.3) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(d, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, out))
    return nn.Sequential(*layers)


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def losses(history):
    return [(h["epoch"], h["train_loss"], h["val_loss"], h["lr"]) for h in history]


def disturb_global_rngs():
    """What a caller might do between two runs; a resumed run must not depend on it."""
    torch.rand(1000)
    np.random.rand(10)
    random.random()


# --- 1. learning ------------------------------------------------------------------------------


def test_learns_linear_regression():
    X, y = regression(n=400)
    model = nn.Sequential(nn.Linear(4, 1))
    result = fit(model, X, y, config(optimizer="adam", lr=0.05, max_epochs=40,
                                     early_stopping="patience", patience=10))
    train = [h["train_loss"] for h in result.history]
    assert result.best_val_loss < 1e-2
    assert result.history[-1]["val_loss"] < 1e-2
    assert np.mean(train[-5:]) < 0.01 * np.mean(train[:5])
    assert result.epochs_run == len(result.history) > 5
    assert not model.training  # left in eval mode
    assert [h["epoch"] for h in result.history] == list(range(result.epochs_run))


# --- 2. resume determinism ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer", "lr", "schedule"),
    [("sgd", 0.02, "stagnation"), ("adam", 0.02, "plateau"), ("adagrad", 0.1, "stagnation")],
)
@pytest.mark.parametrize("stop_at", [3, 5])
def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, optimizer, lr, schedule, stop_at):
    X, y = regression()
    cfg = dict(optimizer=optimizer, lr=lr, warmup_epochs=2, warmup_lr=0.005, schedule=schedule,
               schedule_patience=1, early_stopping="patience", patience=50, restore_best=False)

    full = mlp(seed=1)
    ref = fit(full, X, y, config(max_epochs=8, **cfg))

    ckpt = tmp_path / "run.pt"
    first = fit(mlp(seed=1), X, y, config(max_epochs=stop_at, checkpoint=ckpt, checkpoint_every=2, **cfg))
    assert first.epochs_run == stop_at and ckpt.exists()
    disturb_global_rngs()
    resumed_model = mlp(seed=2)  # another initialisation: everything must come from the checkpoint
    resumed = fit(resumed_model, X, y, config(max_epochs=8, checkpoint=ckpt, **cfg))

    assert losses(resumed.history) == losses(ref.history)
    assert_same_weights(resumed_model, full)
    assert (resumed.best_epoch, resumed.best_val_loss) == (ref.best_epoch, ref.best_val_loss)
    assert min(h["lr"] for h in ref.history[2:]) < lr  # the schedule fired: its state was exercised

    # The test can tell runs apart: dropout draws differ under another seed.
    other = mlp(seed=1)
    fit(other, X, y, config(max_epochs=8, **{**cfg, "seed": 1}))
    assert not torch.equal(other[0].weight, full[0].weight)


def test_resume_with_restore_best_and_finished_checkpoint(tmp_path):
    X, y = regression()
    cfg = dict(optimizer="adam", early_stopping="patience", patience=50, restore_best=True)
    full = mlp(seed=1)
    ref = fit(full, X, y, config(max_epochs=6, **cfg))
    ckpt = tmp_path / "run.pt"
    fit(mlp(seed=1), X, y, config(max_epochs=4, checkpoint=ckpt, **cfg))
    model = mlp(seed=3)
    resumed = fit(model, X, y, config(max_epochs=6, checkpoint=ckpt, **cfg))
    assert losses(resumed.history) == losses(ref.history)
    assert_same_weights(model, full)
    # Resuming a finished run trains no further and returns the same model.
    again_model = mlp(seed=4)
    again = fit(again_model, X, y, config(max_epochs=6, checkpoint=ckpt, **cfg))
    assert losses(again.history) == losses(ref.history)
    assert_same_weights(again_model, full)


class InterruptingLoss:
    """MSE that raises KeyboardInterrupt at one training batch, as Ctrl-C would."""

    def __init__(self, at_batch: int | None):
        self.at_batch, self.calls = at_batch, 0

    def __call__(self, pred, target):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.at_batch:
                raise KeyboardInterrupt
        return nn.functional.mse_loss(pred, target)


def test_keyboard_interrupt_saves_a_resumable_checkpoint(tmp_path):
    X, y = regression()  # 180 training samples: 6 batches of 32 per epoch
    cfg = dict(optimizer="sgd", checkpoint_every=100)
    full = mlp(seed=1)
    ref = fit(full, X, y, config(max_epochs=8, **cfg), loss=InterruptingLoss(None))

    ckpt = tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        fit(mlp(seed=1), X, y, config(max_epochs=8, checkpoint=ckpt, **cfg),
            loss=InterruptingLoss(4 * 6 + 2))  # in the middle of epoch 4
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 3 and len(saved["history"]) == 4

    disturb_global_rngs()
    model = mlp(seed=2)
    resumed = fit(model, X, y, config(max_epochs=8, checkpoint=ckpt, **cfg), loss=InterruptingLoss(None))
    assert losses(resumed.history) == losses(ref.history)
    assert_same_weights(model, full)


# --- 3. early stopping and restore_best ----------------------------------------------------------


def test_early_stopping_on_noise_restores_the_best_weights(tmp_path):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    y = rng.normal(size=(300, 1)).astype(np.float32)
    Xv = rng.normal(size=(100, 5)).astype(np.float32)
    yv = rng.normal(size=(100, 1)).astype(np.float32)
    ckpt = tmp_path / "noise.pt"
    model = mlp(seed=0, d=5, hidden=64, dropout=0)
    result = fit(model, X, y, config(optimizer="adam", lr=1e-2, max_epochs=200, early_stopping="patience",
                                     patience=3, checkpoint=ckpt),
                 X_val=Xv, y_val=yv)

    assert result.stopped_early
    assert result.epochs_run < 60
    vals = [h["val_loss"] for h in result.history]
    assert result.best_val_loss == min(vals) == vals[result.best_epoch]
    assert result.history[-1]["epoch"] == result.best_epoch + 3  # three epochs without improvement

    with torch.no_grad():
        recomputed = nn.functional.mse_loss(model(torch.from_numpy(Xv)), torch.from_numpy(yv)).item()
    assert recomputed == pytest.approx(result.best_val_loss, rel=1e-5)

    saved = torch.load(ckpt, weights_only=True)
    assert saved["best"]["epoch"] == result.best_epoch
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["best"]["state"][key])
    # The last epoch's weights are another model: restore_best did something.
    assert not all(torch.equal(v, saved["model"][k]) for k, v in model.state_dict().items())

    # Interrupted just after the best epoch, the resumed run still counts the epochs without
    # improvement from there, and stops at the same epoch with the same weights.
    first = tmp_path / "interrupted.pt"
    fit(mlp(seed=0, d=5, hidden=64, dropout=0), X, y,
        config(optimizer="adam", lr=1e-2, max_epochs=result.best_epoch + 2, early_stopping="patience",
               patience=3, checkpoint=first), X_val=Xv, y_val=yv)
    resumed_model = mlp(seed=7, d=5, hidden=64, dropout=0)
    resumed = fit(resumed_model, X, y, config(optimizer="adam", lr=1e-2, max_epochs=200,
                                              early_stopping="patience", patience=3, checkpoint=first),
                  X_val=Xv, y_val=yv)
    assert losses(resumed.history) == losses(result.history) and resumed.stopped_early
    assert_same_weights(resumed_model, model)


def test_without_restore_best_the_last_weights_stay():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    y = rng.normal(size=(300, 1)).astype(np.float32)
    model = mlp(seed=0, d=5, hidden=64, dropout=0)
    result = fit(model, X, y, config(optimizer="adam", max_epochs=200, early_stopping="patience",
                                     patience=3, restore_best=False, val_fraction=0.25))
    assert result.stopped_early and result.best_epoch < result.epochs_run - 1


# --- 4. the window rule -----------------------------------------------------------------------


def test_window_rule_on_a_crafted_sequence():
    assert not window_rises([1.0, 2.0, 3.0, 4.0, 5.0], 3)  # fewer than two windows
    assert not window_rises([1.0, 1.0], 1)  # equal means do not count as a rise
    assert window_rises([1.0, 1.1], 1)

    vals = [1.0, 0.9, 0.8, 0.7, 0.7, 0.7, 0.6, 0.8, 0.8, 0.3]
    stop = EarlyStopping("window", 3)
    decisions = [stop.step(v) for v in vals]
    # Means of the 3 before against the last 3, from the 6th value on:
    # .9/.7, .8/.667, .733/.7, .7/.733 (rise), .667/.633.
    assert decisions == [False] * 8 + [True, False]
    assert [window_rises(vals[: i + 1], 3) for i in range(len(vals))] == decisions


def test_patience_rule_on_a_crafted_sequence():
    stop = EarlyStopping("patience", 2)
    assert [stop.step(v) for v in (3.0, 2.0, 2.0, 1.5, 1.6, 1.5)] == [False] * 5 + [True]
    never = EarlyStopping("none", 1)
    assert not any(never.step(v) for v in (1.0, 2.0, 3.0, 4.0))


def test_loop_stops_where_the_window_rule_says(tmp_path):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(300, 5)).astype(np.float32)
    y = rng.normal(size=(300, 1)).astype(np.float32)
    result = fit(mlp(seed=0, d=5, hidden=64, dropout=0), X, y,
                 config(optimizer="adam", max_epochs=200, early_stopping="window", patience=3,
                        val_fraction=0.25))
    vals = [h["val_loss"] for h in result.history]
    fires = [window_rises(vals[: i + 1], 3) for i in range(len(vals))]
    assert result.stopped_early
    assert fires.index(True) == len(vals) - 1


# --- 5. learning-rate rules -------------------------------------------------------------------


def test_warmup_then_lr_in_history():
    X, y = regression()
    result = fit(mlp(seed=0), X, y, config(max_epochs=6, lr=0.01, warmup_epochs=3, warmup_lr=1e-4))
    assert [h["lr"] for h in result.history] == [1e-4] * 3 + [0.01] * 3


def test_stagnation_rule_on_a_crafted_sequence():
    assert window_stagnates([1.0, 1.0], 1)  # equal means: not lower, so it stagnates
    assert not window_stagnates([2.0, 1.0], 1)
    assert not window_stagnates([1.0, 2.0, 3.0], 2)
    train = [4.0, 3.0, 2.0, 1.0, 1.5, 1.5, 1.4, 2.0, 0.1]
    # Means of the last 2 against the 2 before, from the 4th value on:
    # 1.5<3.5, 1.25<2.5, 1.5>=1.5 (×), 1.45>=1.25 (×), 1.7>=1.5 (×), 1.05<1.45.
    s = StagnationSchedule(factor=0.5, window=2)
    lr, lrs = 1.0, []
    for t in train:
        lr = s.step(lr, train_loss=t, val_loss=None)
        lrs.append(lr)
    assert lrs == [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.125, 0.125]

    floor = StagnationSchedule(factor=0.5, window=2, min_lr=0.2)
    lr, lrs = 1.0, []
    for t in train:
        lr = floor.step(lr, train_loss=t, val_loss=None)
        lrs.append(lr)
    assert lrs[5:] == [0.5, 0.25, 0.2, 0.2]


def test_plateau_rule_on_a_crafted_sequence():
    s = PlateauSchedule(factor=0.5, patience=2)
    lr, lrs = 1.0, []
    for v in (3.0, 2.0, 2.0, 2.0, 2.0, 2.5, 1.0, 1.0):
        lr = s.step(lr, train_loss=0.0, val_loss=v)
        lrs.append(lr)
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25]


@pytest.mark.parametrize("schedule", ["stagnation", "plateau"])
def test_loop_applies_the_schedule_after_warmup(schedule):
    X, y = regression()
    cfg = config(optimizer="sgd", lr=0.05, max_epochs=16, warmup_epochs=2, warmup_lr=0.001,
                 schedule=schedule, schedule_factor=0.5, schedule_patience=2)
    result = fit(mlp(seed=0, dropout=0.5), X, y, cfg)
    h = result.history
    rule = (StagnationSchedule(0.5, 2) if schedule == "stagnation" else PlateauSchedule(0.5, 2))
    expected, lr = [0.001, 0.001], 0.05
    for record in h[2:]:
        expected.append(lr)
        lr = rule.step(lr, train_loss=record["train_loss"], val_loss=record["val_loss"])
    assert [r["lr"] for r in h] == expected
    assert min(expected) < 0.05  # the rule fired at least once, so the test says something


# --- 6. JSON log ------------------------------------------------------------------------------


def test_json_log_and_no_temporary_files(tmp_path):
    X, y = regression()
    out = tmp_path / "run"
    result = fit(mlp(seed=0), X, y, config(max_epochs=5, log=out / "log.json",
                                           checkpoint=out / "ckpt.pt", checkpoint_every=2))
    record = json.loads((out / "log.json").read_text())
    assert len(record["history"]) == 5 == result.epochs_run
    assert [r["epoch"] for r in record["history"]] == list(range(5))
    assert {"epoch", "train_loss", "val_loss", "lr", "seconds"} <= set(record["history"][0])
    assert record["finished"] is True
    assert record["best_epoch"] == result.best_epoch
    assert record["config"]["log"] == str(out / "log.json")
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "log.json"]


# --- 7. incompatible resume -------------------------------------------------------------------


def test_incompatible_resume_is_refused(tmp_path):
    X, y = regression()
    ckpt = tmp_path / "run.pt"
    fit(mlp(seed=0), X, y, config(max_epochs=2, checkpoint=ckpt, optimizer="adam", lr=0.01))
    with pytest.raises(ValueError, match="lr=0.01.*lr=0.02"):
        fit(mlp(seed=0), X, y, config(max_epochs=4, checkpoint=ckpt, optimizer="adam", lr=0.02))
    with pytest.raises(ValueError, match="optimizer"):
        fit(mlp(seed=0), X, y, config(max_epochs=4, checkpoint=ckpt, optimizer="sgd", lr=0.01))
    with pytest.raises(ValueError, match="different data"):
        fit(mlp(seed=0), X + 1, y, config(max_epochs=4, checkpoint=ckpt, optimizer="adam", lr=0.01))
    with pytest.raises(ValueError, match="different parameters"):
        fit(mlp(seed=0, hidden=8), X, y, config(max_epochs=4, checkpoint=ckpt, optimizer="adam", lr=0.01))
    # resume=False starts over, whatever the checkpoint holds.
    result = fit(mlp(seed=0), X, y, config(max_epochs=3, checkpoint=ckpt, optimizer="adam", lr=0.02),
                 resume=False)
    assert result.epochs_run == 3


def test_a_foreign_checkpoint_is_refused(tmp_path):
    X, y = regression()
    ckpt = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, ckpt)
    with pytest.raises(ValueError, match="not a bioinverse"):
        fit(mlp(seed=0), X, y, config(checkpoint=ckpt))


# --- 8. bad inputs ----------------------------------------------------------------------------


def test_bad_inputs_are_refused():
    X, y = regression()
    model = mlp(seed=0)
    with pytest.raises(ValueError, match="199 samples but X has 200"):
        fit(model, X, y[:-1], config())
    Xn = X.copy()
    Xn[3, 1] = np.nan
    with pytest.raises(ValueError, match="X: contains 1 non-finite"):
        fit(model, Xn, y, config())
    yi = y.copy()
    yi[0, 0] = np.inf
    with pytest.raises(ValueError, match="y: contains 1 non-finite"):
        fit(model, X, yi, config())
    with pytest.raises(ValueError, match="empty"):
        fit(model, X[:0], y[:0], config())
    with pytest.raises(ValueError, match="pass both X_val and y_val"):
        fit(model, X, y, config(), X_val=X)
    with pytest.raises(ValueError, match="do not match model outputs"):
        fit(model, X, y[:, 0], config())  # (n,) targets against (n, 1) outputs would broadcast
    with pytest.raises(ValueError, match="too few"):
        fit(model, X[:1], y[:1], config())


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="warmup_lr"):
        TrainConfig(warmup_epochs=3)
    with pytest.raises(ValueError, match="val_fraction"):
        TrainConfig(val_fraction=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    X, y = regression()
    with pytest.raises(ValueError, match="needs validation data"):
        fit(mlp(seed=0), X, y, config(val_fraction=0.0, early_stopping="patience"))


def test_training_without_validation():
    X, y = regression()
    result = fit(mlp(seed=0), X, y, config(val_fraction=0.0, max_epochs=3, schedule="stagnation",
                                           schedule_patience=1))
    assert [h["val_loss"] for h in result.history] == [None] * 3
    assert result.best_epoch == 2 and math.isnan(result.best_val_loss)


# --- 9. devices and seeds ---------------------------------------------------------------------


def test_select_device(monkeypatch):
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert select_device("auto").type == expected
    assert select_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="'cuda' was requested but .*use 'cpu' or 'auto'"):
        select_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        select_device("quantum")


def test_seed_everything():
    seed_everything(5)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# --- 10. classification -----------------------------------------------------------------------


def test_cross_entropy_separates_two_classes():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=400)
    X = (rng.normal(size=(400, 2)) + np.where(labels[:, None] == 1, 2.0, -2.0)).astype(np.float32)
    model = mlp(seed=0, d=2, hidden=16, out=2, dropout=0)
    result = fit(model, X, labels, config(loss="cross_entropy", optimizer="adam", lr=0.02, max_epochs=15))
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(X)).argmax(1).numpy() == labels).mean()
    assert accuracy > 0.95
    assert result.best_val_loss < 0.2


def test_bce_logits_takes_integer_labels():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, size=(300, 1))
    X = (rng.normal(size=(300, 2)) + np.where(labels == 1, 2.0, -2.0)).astype(np.float32)
    model = mlp(seed=0, d=2, hidden=8, out=1, dropout=0)
    fit(model, X, labels, config(loss="bce_logits", optimizer="adam", lr=0.02, max_epochs=10))
    with torch.no_grad():
        accuracy = ((model(torch.from_numpy(X)) > 0).numpy() == (labels == 1)).mean()
    assert accuracy > 0.95


# --- progress display -------------------------------------------------------------------------


def test_progress_bar_outside_a_terminal(capsys):
    X, y = regression()
    fit(mlp(seed=0), X, y, config(max_epochs=2, progress=True))


def test_progress_bar_rendered(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich then draws as if on a terminal
    X, y = regression()
    fit(mlp(seed=0), X, y, config(max_epochs=2, progress=True))
    assert "lr 0.01" in capsys.readouterr().err


def test_cosine_schedule_runs_half_a_cosine_after_warmup_and_fixes_max_epochs(tmp_path):
    X, y = regression(n=64)
    cfg = config(val_fraction=0.0, early_stopping="none", max_epochs=6, warmup_epochs=2, warmup_lr=0.001,
                 lr=0.01, min_lr=0.001, schedule="cosine")
    result = fit(mlp(seed=0), X, y, cfg)
    expected = [0.001, 0.001] + [0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    np.testing.assert_allclose([h["lr"] for h in result.history], expected, rtol=1e-12)
    # Stretching the curve over more epochs would change the trajectory: resuming must refuse it.
    ckpt = tmp_path / "c.pt"
    fit(mlp(seed=0), X, y, dataclasses.replace(cfg, checkpoint=ckpt, max_epochs=3))
    with pytest.raises(ValueError, match="max_epochs"):
        fit(mlp(seed=0), X, y, dataclasses.replace(cfg, checkpoint=ckpt, max_epochs=6))


def _noisy_inputs(x, y, generator):
    """An augmentation: input noise drawn from the trainer's generator."""
    return x + 0.1 * torch.randn(x.shape, generator=generator), y


def test_augmentation_applies_to_training_batches_and_resumes_exactly(tmp_path):
    X, y = regression()
    cfg = dict(optimizer="adam", early_stopping="patience", patience=50, restore_best=False)
    full = mlp(seed=1)
    ref = fit(full, X, y, config(max_epochs=6, **cfg), augment=_noisy_inputs)
    plain = mlp(seed=1)
    unaugmented = fit(plain, X, y, config(max_epochs=6, **cfg))
    assert losses(ref.history) != losses(unaugmented.history)  # the augmentation was applied
    ckpt = tmp_path / "run.pt"
    fit(mlp(seed=1), X, y, config(max_epochs=3, checkpoint=ckpt, **cfg), augment=_noisy_inputs)
    disturb_global_rngs()
    model = mlp(seed=2)
    resumed = fit(model, X, y, config(max_epochs=6, checkpoint=ckpt, **cfg), augment=_noisy_inputs)
    assert losses(resumed.history) == losses(ref.history)
    assert_same_weights(model, full)
    with pytest.raises(InputError, match="augment"):  # a checkpoint of another augmentation is not resumed
        fit(mlp(seed=1), X, y, config(max_epochs=7, checkpoint=ckpt, **cfg))
