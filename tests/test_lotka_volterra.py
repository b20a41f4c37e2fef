"""The data generator against an independent integrator, and every kind of bad data file."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from experiments.lib.science.lotka_volterra import (
    PARAM_NAMES,
    PARAM_RANGES,
    DataError,
    default_dataset,
    generate_dataset,
    integrate,
    load_h5,
    load_params,
    rm_derivatives,
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
    # the default data set (seed 0): 30 systems at random plus the 10 that come closest to zero,
    # where relative accuracy is hardest
    traj, time, params = generate_dataset(1000, seed=0)
    assert traj.shape == (1000, 100, 2) and time.shape == (100,) and params.shape == (1000, 6)
    assert np.array_equal(time, np.linspace(0, 200, 100))
    lowest = np.argsort(traj.min(axis=(1, 2)))[:10]
    picked = np.union1d(np.random.default_rng(0).choice(1000, 30, replace=False), lowest)
    for i in picked:
        # atol far below the smallest value, so the reference is controlled by rtol everywhere
        ref = solve_ivp(_scipy_rhs(params[i]), (0, 200), traj[i, 0], method="DOP853", rtol=1e-12, atol=1e-20,
                        t_eval=time).y.T
        assert np.max(np.abs(traj[i] - ref) / np.abs(ref)) < 1e-6, i


def test_derivatives_match_the_equations():
    rng = np.random.default_rng(5)
    x, y = rng.uniform(0, 10, 50), rng.uniform(0, 10, 50)
    p = dict(zip(PARAM_NAMES, rng.uniform(0.1, 2, (6, 50)), strict=True))
    dx, dy = rm_derivatives(x, y, p)
    for j in range(50):
        want = _scipy_rhs([p[k][j] for k in PARAM_NAMES])(0.0, [x[j], y[j]])
        assert dx[j] == pytest.approx(want[0], rel=1e-12) and dy[j] == pytest.approx(want[1], rel=1e-12)


def test_integrate_torch_matches_numpy_and_differentiates():
    torch = pytest.importorskip("torch")
    values = {"r": 0.2, "K": 8.0, "a": 0.3, "h": 0.5, "e": 0.5, "m": 0.2}
    t = np.linspace(0, 20, 11)
    ref = integrate(1.0, 1.1, values, t, substeps=4)
    assert isinstance(ref, np.ndarray) and ref.shape == (11, 2)
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in values.items()}
    out = integrate(np.float64(1.0), 1.1, p, t, substeps=4)   # numpy state, torch parameters
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-14, atol=0)
    out[-1].sum().backward()
    for k in values:   # gradient against a central difference of the numpy integration
        eps = 1e-6 * values[k]
        hi = integrate(1.0, 1.1, {**values, k: values[k] + eps}, t, substeps=4)[-1].sum()
        lo = integrate(1.0, 1.1, {**values, k: values[k] - eps}, t, substeps=4)[-1].sum()
        assert p[k].grad.item() == pytest.approx((hi - lo) / (2 * eps), rel=1e-5, abs=1e-8), k
    # one initial state against a batch of parameter sets: the state broadcasts
    batch = integrate(torch.tensor(1.0, dtype=torch.float64), 1.1,
                      {**values, "r": torch.tensor([0.2, 0.3], dtype=torch.float64)}, torch.tensor(t), substeps=4)
    assert batch.shape == (2, 11, 2)
    np.testing.assert_allclose(batch[0].numpy(), ref, rtol=1e-14)
    with pytest.raises(ValueError, match="substeps"):
        integrate(1.0, 1.0, values, t, substeps=0)


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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5"]   # no temp file left behind
    t2, time2 = load_h5(path)
    assert np.array_equal(t2, traj) and np.array_equal(time2, time)
    with h5py.File(path) as f:
        assert set(f.keys()) == {"trajectories", "time", "params"}
        assert f["trajectories"].shape == (5, 100, 2) and f["time"].shape == (100,)
        assert f["params"].attrs["columns"] == ",".join(PARAM_NAMES)
        assert np.array_equal(f["params"][()], params)
    named = load_params(path)
    assert list(named) == list(PARAM_NAMES) and np.array_equal(named["h"], params[:, 3])
    monkeypatch.setenv("QWEN_LORA_TS_DATA", str(tmp_path / "default.h5"))
    p = default_dataset(n_systems=4)
    mtime = p.stat().st_mtime_ns
    assert default_dataset(n_systems=4) == p and p.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert load_h5(p)[0].shape == (4, 100, 2)
    assert np.array_equal(load_h5(p)[0], generate_dataset(4, seed=0)[0])


def test_save_refuses_the_wrong_shapes(tmp_path):
    traj, time, params = generate_dataset(3, seed=1)
    with pytest.raises(ValueError, match="not"):
        save_h5(tmp_path / "a.h5", traj[..., :1], time)
    with pytest.raises(ValueError, match="not"):
        save_h5(tmp_path / "a.h5", traj, time[:-1])
    with pytest.raises(ValueError, match="params"):
        save_h5(tmp_path / "a.h5", traj, time, params[:2])
    assert not list(tmp_path.iterdir())


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
    ({"trajectories": np.ones((0, 5, 2)), "time": GOOD_TIME}, "holds no series"),
    ({"trajectories": GOOD_T, "time": np.array([0.0, 1.0, np.inf, 3.0, 4.0])}, "finite and strictly increasing"),
])
def test_bad_files_are_rejected_with_the_problem(tmp_path, datasets, message):
    path = _write(tmp_path / "bad.h5", **datasets)
    with pytest.raises(DataError, match=message) as e:
        load_h5(path)
    assert str(path) in str(e.value)


def test_a_group_is_not_a_dataset(tmp_path):
    path = tmp_path / "group.h5"
    with h5py.File(path, "w") as f:
        f.create_group("trajectories")
        f["time"] = GOOD_TIME
    with pytest.raises(DataError, match="missing dataset 'trajectories'"):
        load_h5(path)


def test_missing_and_non_hdf5_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_h5(tmp_path / "nope.h5")
    with pytest.raises(DataError, match="not a regular file"):
        load_h5(tmp_path)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DataError, match="not a readable HDF5 file"):
        load_h5(tmp_path / "text.h5")
    good = save_h5(tmp_path / "good.h5", *generate_dataset(3, seed=0))
    (tmp_path / "cut.h5").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError, match="cut.h5: not a readable HDF5 file"):
        load_h5(tmp_path / "cut.h5")
