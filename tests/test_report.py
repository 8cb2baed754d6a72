import pytest
import torch

from collapse_ext import lpm

pytest.importorskip("matplotlib")

from collapse_ext.report import plot_minority_collapse  # noqa: E402


@pytest.fixture(scope="module")
def sweep():
    ratios = torch.logspace(0, 3, 5, dtype=torch.float64)
    return lpm.minority_collapse_sweep(6, 3, ratios, 1.0, 5.0, threshold=True, rounds=2, points=4)


def test_plot_minority_collapse_writes_a_figure(sweep, tmp_path):
    path = tmp_path / "minority.png"
    fig = plot_minority_collapse(sweep, path)
    assert path.exists() and path.stat().st_size > 10_000
    with path.open("rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ax_cos, ax_norm = fig.axes
    assert ax_cos.get_xscale() == "log" and ax_norm.get_xscale() == "log"
    # Minority cosine, majority cosine, the ETF line and the threshold line.
    curves = ax_cos.get_lines()
    minority = curves[0].get_ydata()
    assert minority[0] == pytest.approx(-0.2, abs=1e-6) and minority[-1] > 0.99
    assert any(line.get_xdata()[0] == pytest.approx(sweep.threshold) for line in curves[2:])
    assert len(ax_norm.get_lines()) >= 3


def test_plot_without_path_returns_the_figure(sweep):
    import matplotlib.pyplot as plt

    fig = plot_minority_collapse(sweep)
    assert len(fig.axes) == 2
    plt.close(fig)


def test_plot_rejects_other_input():
    with pytest.raises(TypeError, match="Expected `sweep_result` to be a SweepResult"):
        plot_minority_collapse({"ratio": [1, 2]})
