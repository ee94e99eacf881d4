"""fedcl.files: the atomic CSV and PNG writers every report shares."""

import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedcl.files import save_figure, write_csv  # noqa: E402


def test_write_csv_puts_leading_columns_first_and_keeps_first_seen_order(tmp_path):
    path = write_csv([{"b": 1, "a": 2}, {"c": 3, "a": 4}], tmp_path / "out.csv", leading=("a",))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["a", "b", "c"]
        assert [row["c"] for row in reader] == ["", "3"]


def test_save_figure_writes_a_png_closes_the_figure_and_leaves_no_temporary(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
