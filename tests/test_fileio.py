"""The one atomic writer: a failed or interrupted write leaves the old file whole and no temporary file behind."""

from __future__ import annotations

import pytest

from adtr_deploy.fileio import atomic_copy, atomic_write, atomic_write_text, write_json_atomic


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_writer_that_fails_halfway_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = atomic_write_text(tmp_path / "report.md", "old\n")

    def half_then_fail(fh):
        fh.write(b"new, but only ha")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


def test_text_mode_keeps_newlines_as_written_for_csv(tmp_path):
    import csv

    path = atomic_write(tmp_path / "sub" / "t.csv", lambda fh: csv.writer(fh).writerow(["a", "b"]), text=True)
    assert path.read_bytes() == b"a,b\r\n"  # the csv module's own line ending, not translated twice


def test_copy_and_json_replace_the_target_whole(tmp_path):
    src = tmp_path / "model.onnx"
    src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB: more than one copy block
    dst = atomic_copy(src, tmp_path / "repo" / "1" / "model.onnx")
    assert dst.read_bytes() == src.read_bytes()
    out = write_json_atomic({"path": tmp_path, "n": 1}, tmp_path / "m.json")
    assert out.read_text() == f'{{\n  "path": "{tmp_path}",\n  "n": 1\n}}\n'
