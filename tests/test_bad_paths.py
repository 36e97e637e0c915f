"""A folder argument given as an existing file, or a manifest listing a folder as an image: one line naming the
flag (or the manifest's line) and the problem, exit status 2, before anything is written or started."""

from __future__ import annotations

import pytest

from fedmedclip.cli import main


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


def _one_line_error(capsys, expected: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err == f"error: {expected}", err


def test_stack_up_with_a_file_as_data_dir_names_the_flag(a_file, tmp_path, capsys):
    """`stack up --data-dir FILE` said "[Errno 17] File exists" (exit 1)."""
    assert main(["stack", "up", "--data-dir", str(a_file)]) == 2
    _one_line_error(capsys, f"--data-dir {a_file}: is a file, not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"] and a_file.read_text() == "x"  # nothing written
    # A file above it: "[Errno 20] Not a directory" (exit 1).
    assert main(["stack", "up", "--data-dir", str(a_file / "stack")]) == 2
    _one_line_error(capsys, f"--data-dir {a_file / 'stack'}: {a_file} is a file, not a directory")


def test_stack_add_bucket_with_a_file_as_data_dir_names_the_flag(a_file, capsys):
    """`stack add-bucket --data-dir FILE BUCKET` said "[Errno 17] File exists" (exit 1)."""
    assert main(["stack", "add-bucket", "--data-dir", str(a_file), "some-bucket"]) == 2
    _one_line_error(capsys, f"--data-dir {a_file}: is a file, not a directory")


def test_pipeline_run_with_a_file_as_pipeline_root_names_the_flag(a_file, tmp_path, capsys):
    """`pipeline run --local --pipeline-root FILE` said "[Errno 17] File exists" (exit 1)."""
    assert main(["pipeline", "run", "--local", "--pipeline-root", str(a_file), "--rounds", "1"]) == 2
    _one_line_error(capsys, f"--pipeline-root {a_file}: is a file, not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]  # nothing compiled, no task started


def test_demo_with_a_file_as_stack_dir_names_the_flag(a_file, tmp_path, capsys):
    """`demo --stack-dir FILE` said "[Errno 17] File exists" (exit 1)."""
    assert main(["demo", "--stack-dir", str(a_file), "--rounds", "1"]) == 2
    _one_line_error(capsys, f"--stack-dir {a_file}: is a file, not a directory")
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]  # no stack started


def test_a_manifest_listing_a_folder_says_it_is_a_directory(tmp_path, capsys):
    """A manifest row naming a folder said the image file "does not exist"."""
    (tmp_path / "scans").mkdir()
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label\nscans,glioma\n")
    assert main(["train", "--data", str(manifest), "--out", str(tmp_path / "run")]) == 2
    folder = str((tmp_path / "scans").resolve())
    _one_line_error(capsys, f"{manifest}:2: image path {folder!r} is a directory, not an image file")
