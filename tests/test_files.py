"""fedcl.files: the atomic CSV and PNG writers every report shares."""

import csv
import errno
import os
import stat

import matplotlib
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fedcl.files import atomic_write, fsync_directory, save_figure, write_csv  # noqa: E402


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


def test_atomic_write_syncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    """The folder's fd is fsynced after os.replace, so the rename itself survives a power loss."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", None))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "out.bin", lambda f: f.write(b"data"))
    assert events == [("fsync", False), ("replace", None), ("fsync", True)]
    assert (tmp_path / "out.bin").read_bytes() == b"data"


def raising(err: OSError):
    """A stand-in for os.open or os.fsync that fails with `err`."""
    def fail(*args, **kwargs):
        raise err
    return fail


def test_fsync_directory_skips_folders_that_cannot_be_opened_or_synced_but_raises_io_errors(tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        patch.setattr(os, "open", raising(PermissionError(errno.EACCES, "folders cannot be opened here")))
        fsync_directory(tmp_path)
    monkeypatch.setattr(os, "fsync", raising(OSError(errno.EINVAL, "no folder sync")))
    fsync_directory(tmp_path)
    monkeypatch.setattr(os, "fsync", raising(OSError(errno.EIO, "disk failed")))
    with pytest.raises(OSError, match="disk failed"):
        fsync_directory(tmp_path)
