"""The data generator against an independent integrator, and every kind of bad data file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from experiments.lotka_volterra import (
    PARAM_NAMES,
    PARAM_RANGES,
    DataError,
    default_dataset,
    generate_dataset,
    load_h5,
    save_h5,
)


def _scipy_rhs(p):
    r, K, a, h, e, m = p  # written out again here, independently of rm_derivatives

    def f(_, s):
        x, y = s
        eaten = a * x * y / (1 + a * h * x)
        return [r * x * (1 - x / K) - eaten, e * eaten - m * y]

    return f


def test_generator_agrees_with_dop853():
    traj, time, params = generate_dataset(40, seed=3)
    assert traj.shape == (40, 100, 2) and time.shape == (100,) and params.shape == (40, 6)
    assert np.array_equal(time, np.linspace(0, 200, 100))
    for i in range(40):
        ref = solve_ivp(_scipy_rhs(params[i]), (0, 200), traj[i, 0], method="DOP853", rtol=1e-13, atol=1e-14,
                        t_eval=time).y.T
        assert np.max(np.abs(traj[i] - ref) / np.abs(ref)) < 1e-6


def test_parameters_in_ranges_and_seeded():
    a, _, pa = generate_dataset(30, seed=7)
    b, _, pb = generate_dataset(30, seed=7)
    c, _, _ = generate_dataset(30, seed=8)
    assert np.array_equal(a, b) and np.array_equal(pa, pb)   # bit for bit
    assert not np.array_equal(a, c)
    for j, k in enumerate(PARAM_NAMES):
        lo, hi = PARAM_RANGES[k]
        assert (pa[:, j] >= lo).all() and (pa[:, j] <= hi).all()
    assert ((a[:, 0] >= 0.8) & (a[:, 0] <= 1.2)).all()
    assert (a > 0).all()


def test_save_load_round_trip_and_default(tmp_path, monkeypatch):
    traj, time, params = generate_dataset(5, seed=1)
    path = save_h5(tmp_path / "d.h5", traj, time, params)
    t2, time2 = load_h5(path)
    assert np.array_equal(t2, traj) and np.array_equal(time2, time)
    with h5py.File(path) as f:
        assert f["params"].attrs["columns"] == ",".join(PARAM_NAMES)
        assert np.array_equal(f["params"][()], params)
    monkeypatch.setenv("QWEN_LORA_TS_DATA", str(tmp_path / "default.h5"))
    p = default_dataset(n_systems=4)
    mtime = p.stat().st_mtime_ns
    assert default_dataset(n_systems=4) == p and p.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert load_h5(p)[0].shape == (4, 100, 2)


def test_original_coursework_layout_is_accepted(tmp_path):
    # float32, no params, as the coursework file stores it
    path = tmp_path / "cw.h5"
    with h5py.File(path, "w") as f:
        f["trajectories"] = np.random.default_rng(0).uniform(0, 5, (3, 100, 2)).astype(np.float32)
        f["time"] = np.linspace(0, 200, 100).astype(np.float32)
    traj, time = load_h5(path)
    assert traj.dtype == np.float64 and traj.shape == (3, 100, 2)


def _write(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f[k] = v
    return path


GOOD_T = np.ones((2, 5, 2))
GOOD_TIME = np.arange(5.0)


@pytest.mark.parametrize("datasets, message", [
    ({"time": GOOD_TIME}, "missing dataset 'trajectories'"),
    ({"trajectories": GOOD_T}, "missing dataset 'time'"),
    ({"trajectories": np.ones((2, 5)), "time": GOOD_TIME}, r"shape \(2, 5\); expected \(systems, time steps, 2\)"),
    ({"trajectories": np.ones((2, 5, 3)), "time": GOOD_TIME}, r"shape \(2, 5, 3\)"),
    ({"trajectories": GOOD_T, "time": np.arange(6.0)}, "5 time steps but 'time' has 6"),
    ({"trajectories": GOOD_T, "time": np.ones((5, 1))}, r"'time' has shape \(5, 1\)"),
    ({"trajectories": np.where(np.arange(20).reshape(2, 5, 2) == 13, np.nan, 1.0), "time": GOOD_TIME},
     "non-finite value.*system 1, step 1, predator"),
    ({"trajectories": np.where(np.arange(20).reshape(2, 5, 2) == 4, -0.5, 1.0), "time": GOOD_TIME},
     "negative value.*system 0, step 2, prey: -0.5"),
    ({"trajectories": GOOD_T, "time": np.array([0.0, 1.0, 1.0, 2.0, 3.0])}, "strictly increasing.*time\\[2\\] = 1.0"),
    ({"trajectories": np.array([b"a"] * 20).reshape(2, 5, 2), "time": GOOD_TIME}, "must be numeric"),
])
def test_bad_files_are_rejected_with_the_problem(tmp_path, datasets, message):
    path = _write(tmp_path / "bad.h5", **datasets)
    with pytest.raises(DataError, match=message) as e:
        load_h5(path)
    assert str(path) in str(e.value)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_h5(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        load_h5(tmp_path / "text.h5")
