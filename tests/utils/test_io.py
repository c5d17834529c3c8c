"""Safe output (m3vit.utils.io): atomic files and folders, ownership, manifests, locks, the umask."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m3vit.utils.errors import M3ViTError, OutputError, RunLockedError
from m3vit.utils.io import (MANIFEST_FILE, FolderLock, OutputFolder, OutputKind, atomic_directory, current_umask,
                            exchange_paths, remove_output, write_json, write_text)

KIND = OutputKind("report", frozenset({"a.txt", "b.txt"}), lambda folder: (folder / "a.txt").is_file())


@pytest.fixture
def umask():
    """Set the process umask for a test, restore it after."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(mask):
        os.umask(mask)
        return mask

    yield set_mask
    os.umask(saved)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    path = write_json(tmp_path / "report.json", {"format": "x"})
    os.chmod(path, 0o600)
    write_json(path, {"format": "x", "again": True})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and json.loads(path.read_text())["again"]


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_and_folders_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    write_text(tmp_path / "f.txt", "x")
    assert mode(tmp_path / "f.txt") == 0o666 & ~mask
    with atomic_directory(tmp_path / "out", KIND) as tmp:
        write_text(tmp / "a.txt", "1")
    assert mode(tmp_path / "out") == 0o777 & ~mask
    assert mode(tmp_path / "out" / "a.txt") == 0o666 & ~mask


def test_a_write_error_names_the_users_path_not_a_temporary_one(tmp_path):
    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device", tmp)

    from m3vit.utils.io import write_atomic

    with pytest.raises(OutputError) as info:
        write_atomic(tmp_path / "results.json", full)
    message = str(info.value)
    assert str(tmp_path / "results.json") in message and "no space left" in message
    assert "m3vit-tmp" not in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # the temporary file is gone


def test_atomic_directory_refuses_what_is_not_its_kind(tmp_path):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"user exists and is not an m3vit report \(it holds notes.txt\)"):
        with atomic_directory(user, KIND):
            pytest.fail("the body must not run")
    plain = tmp_path / "notes.txt"
    plain.write_text("mine")
    with pytest.raises(OutputError, match="is not a folder"):
        with atomic_directory(plain, KIND):
            pass
    # a folder with the kind's names but not its identity (identify says no) is not replaced either
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "b.txt").write_text("mine")
    with pytest.raises(OutputError):
        with atomic_directory(fake, KIND):
            pass
    assert (user / "notes.txt").read_text() == plain.read_text() == (fake / "b.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake", "notes.txt", "user"]


def test_atomic_directory_replaces_its_own_kind_and_leaves_nothing_temporary(tmp_path):
    for text in ("first", "second"):
        with atomic_directory(tmp_path / "out", KIND) as tmp:
            write_text(tmp / "a.txt", text)
    assert (tmp_path / "out" / "a.txt").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(tmp_path / "out", KIND) as tmp:
            write_text(tmp / "a.txt", "third")
            raise RuntimeError("boom")
    assert (tmp_path / "out" / "a.txt").read_text() == "second" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_folder_that_became_foreign_during_the_work_is_not_replaced(tmp_path):
    with atomic_directory(tmp_path / "out", KIND) as tmp:
        write_text(tmp / "a.txt", "1")
    with pytest.raises(OutputError):
        with atomic_directory(tmp_path / "out", KIND) as tmp:
            (tmp_path / "out" / "notes.txt").write_text("added by the user meanwhile")
            write_text(tmp / "a.txt", "2")
    assert (tmp_path / "out" / "notes.txt").is_file() and (tmp_path / "out" / "a.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_exchange_paths_swaps_two_folders_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "name.txt").write_text(folder.name)
    if not exchange_paths(a, b):
        pytest.skip("this system or file system has no atomic exchange (renameat2)")
    assert (a / "name.txt").read_text() == "b" and (b / "name.txt").read_text() == "a"
    with pytest.raises(FileNotFoundError):
        exchange_paths(tmp_path / "absent", b)


@pytest.mark.parametrize("atomic", [True, False])
def test_replacing_a_folder_output_never_leaves_the_path_missing(tmp_path, monkeypatch, atomic):
    """The old output and the new one swap in one step: a crash right after it (here: deleting the old one
    fails) finds the new output in place. Without an atomic exchange the two renames still replace it."""
    import m3vit.utils.io as io

    if not atomic:
        monkeypatch.setattr(io, "exchange_paths", lambda a, b: False)
    target = tmp_path / "out"
    with atomic_directory(target, KIND) as tmp:
        write_text(tmp / "a.txt", "old")

    def crash(path, kind):
        raise KeyboardInterrupt("killed while deleting the old output")

    monkeypatch.setattr(io, "remove_output", crash)
    if atomic:  # a kill at any rename finds the output in place
        real_replace = os.replace

        def replace_then_check(src, dst):
            real_replace(src, dst)
            assert target.is_dir(), "the output is missing between two renames"

        monkeypatch.setattr(io.os, "replace", replace_then_check)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target, KIND) as tmp:
            write_text(tmp / "a.txt", "new")
    assert (target / "a.txt").read_text() == "new"


def test_a_killed_builds_temporary_folder_is_swept_by_the_next_one(tmp_path):
    """What a process killed while building ``out`` left (its unlocked temporary folder, holding only this
    kind's files) goes when ``out`` is next written; a temporary folder another process is still building
    (locked), one holding a user's file, and other names stay."""
    target = tmp_path / "out"
    stale = tmp_path / ".out.m3vit-tmp-dead01"
    busy = tmp_path / ".out.m3vit-tmp-busy01"
    foreign = tmp_path / ".out.m3vit-tmp-mine01"
    other = tmp_path / ".other.m3vit-tmp-dead02"
    for folder in (stale, busy, foreign, other):
        folder.mkdir()
        (folder / "a.txt").write_text("partial")
    (foreign / "notes.txt").write_text("the user's")
    with FolderLock(busy, create=False):
        with atomic_directory(target, KIND) as tmp:
            write_text(tmp / "a.txt", "new")
    assert not stale.exists() and busy.is_dir() and (foreign / "notes.txt").is_file() and other.is_dir()
    assert (target / "a.txt").read_text() == "new"


def test_remove_output_deletes_only_the_kinds_files(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "mine.txt"):
        (folder / name).write_text(name)
    assert remove_output(folder, KIND) == ["mine.txt"]
    assert [p.name for p in folder.iterdir()] == ["mine.txt"]
    (folder / "mine.txt").unlink()
    (folder / "a.txt").write_text("x")
    assert remove_output(folder, KIND) == [] and not folder.exists()


def test_a_link_to_an_output_is_neither_recognised_nor_removed_through(tmp_path):
    """What a link points to is not the output's: it is not replaced, and removing the output never
    deletes the files it points to."""
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.txt").write_text("the user's")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert KIND.recognises(real) and not KIND.recognises(link)
    with pytest.raises(OutputError, match="is a link"):
        remove_output(link, KIND)
    with pytest.raises(OutputError, match="not a folder"):
        with atomic_directory(link, KIND) as tmp:
            write_text(tmp / "a.txt", "new")
    assert (real / "a.txt").read_text() == "the user's" and link.is_symlink()


names = st.sampled_from(["a.txt", "b.txt", "notes.txt", ".git", "data.csv"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.lists(names, unique=True, max_size=4), as_dirs=st.lists(st.booleans(), min_size=4, max_size=4))
def test_property_nothing_the_kind_does_not_write_is_ever_lost(tmp_path_factory, content, as_dirs):
    root = tmp_path_factory.mktemp("prop")
    target = root / "out"
    target.mkdir()
    for name, is_dir in zip(content, as_dirs):
        (target / name).mkdir() if is_dir else (target / name).write_text(f"user {name}")
    before = {p.name: p.is_dir() for p in target.iterdir()}
    replaceable = KIND.recognises(target) or not before
    try:
        with atomic_directory(target, KIND) as tmp:
            write_text(tmp / "a.txt", "new")
    except OutputError:
        assert not replaceable
        assert {p.name: p.is_dir() for p in target.iterdir()} == before  # untouched
    else:
        assert replaceable
        assert [p.name for p in target.iterdir()] == ["a.txt"]
    assert sorted(p.name for p in root.iterdir()) == ["out"]  # no temporary or old folder left


def test_output_folder_never_overwrites_a_file_it_did_not_write(tmp_path):
    out = tmp_path / "preds"
    out.mkdir()
    (out / "photo_semseg.png").write_text("the user's own file")
    with OutputFolder(out, kind="infer") as folder:
        with pytest.raises(OutputError, match="photo_semseg.png exists and was not written by m3vit"):
            folder.claim(["photo_depth.png", "photo_semseg.png"])
        write_text(folder.path("photo_depth.png"), "ours")
    assert (out / "photo_semseg.png").read_text() == "the user's own file"
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["kind"] == "infer" and manifest["files"] == ["photo_depth.png"]
    with OutputFolder(out, kind="infer") as folder:  # a later run may replace what m3vit wrote
        write_text(folder.path("photo_depth.png"), "ours again")
    assert (out / "photo_depth.png").read_text() == "ours again"
    with pytest.raises(OutputError, match="holds m3vit infer outputs, not experts outputs"):
        with OutputFolder(out, kind="experts"):
            pass


def test_output_folder_never_overwrites_a_file_the_user_changed_after_m3vit_wrote_it(tmp_path):
    """A file m3vit wrote and the user then edited in place (a hand-corrected mask) is the user's now: the
    next run refuses it. An untouched one, and one listed by an older manifest without stamps, are replaced."""
    out = tmp_path / "preds"
    with OutputFolder(out, kind="infer") as folder:
        write_text(folder.path("a_semseg.png"), "ours")
        write_text(folder.path("b_semseg.png"), "ours")
        write_text(folder.path("a_semseg.png"), "ours, written twice in one run")
    (out / "a_semseg.png").write_text("corrected by hand")
    with OutputFolder(out, kind="infer") as folder:
        with pytest.raises(OutputError, match="a_semseg.png was changed after m3vit wrote it"):
            folder.claim(["b_semseg.png", "a_semseg.png"])
        write_text(folder.path("b_semseg.png"), "ours again")
    assert (out / "a_semseg.png").read_text() == "corrected by hand"
    with OutputFolder(out, kind="infer") as folder:  # still refused: the refused run kept its old stamp
        with pytest.raises(OutputError, match="a_semseg.png was changed after m3vit wrote it"):
            folder.claim(["a_semseg.png"])
    # the same size, edited in place: the content tells
    (out / "b_semseg.png").write_text("OURS AGAIN")
    with OutputFolder(out, kind="infer") as folder:
        with pytest.raises(OutputError, match="b_semseg.png was changed after m3vit wrote it"):
            folder.claim(["b_semseg.png"])
    # a copy of the folder (new modification times, the same content) is still m3vit's
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, copy_function=shutil.copyfile)
    (copy / "a_semseg.png").unlink()
    (copy / "b_semseg.png").write_text("ours again")
    with OutputFolder(copy, kind="infer") as folder:
        write_text(folder.path("b_semseg.png"), "ours, rewritten")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    del manifest["stamps"]  # as m3vit wrote it before the stamps
    (out / MANIFEST_FILE).write_text(json.dumps(manifest))
    with OutputFolder(out, kind="infer") as folder:
        write_text(folder.path("a_semseg.png"), "ours")
    assert (out / "a_semseg.png").read_text() == "ours"


@pytest.mark.parametrize("name", [MANIFEST_FILE, ".m3vit-output.journal"])
def test_a_manifest_or_journal_that_is_a_folder_refuses_the_output_folder_before_any_write(tmp_path, name):
    out = tmp_path / "preds"
    (out / name).mkdir(parents=True)
    with pytest.raises(OutputError, match="is damaged"):
        with OutputFolder(out, kind="infer"):
            pass
    assert [p.name for p in out.iterdir()] == [name]


def test_output_folder_that_wrote_nothing_leaves_no_trace(tmp_path):
    with pytest.raises(M3ViTError):
        with OutputFolder(tmp_path / "new", kind="demo"):
            raise OutputError("a config error before any output")
    assert list(tmp_path.iterdir()) == []


def test_a_journal_that_could_not_be_written_leaves_nothing_and_the_rerun_works(tmp_path, monkeypatch):
    """A full disk while the journal is created: the error names the journal, the empty folder m3vit made
    is gone, and a rerun (space freed) writes normally."""
    import m3vit.utils.io as io

    real_write = os.write

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "preds"
    monkeypatch.setattr(io.os, "write", full_disk)
    with pytest.raises(OutputError, match="no space left"):
        with OutputFolder(out, kind="infer") as folder:
            write_text(folder.path("a.png"), "x")
    assert not out.exists()
    monkeypatch.setattr(io.os, "write", real_write)
    with OutputFolder(out, kind="infer") as folder:
        write_text(folder.path("a.png"), "x")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, "a.png"]


@pytest.mark.parametrize("journal", [b"", b'{"format": "m3vit-out'])
def test_a_journal_with_no_whole_line_recorded_nothing(tmp_path, journal):
    """An empty journal, or one whose header was torn by a kill, recorded no file: the folder is usable."""
    out = tmp_path / "preds"
    out.mkdir()
    (out / ".m3vit-output.journal").write_bytes(journal)
    with OutputFolder(out, kind="infer") as folder:
        write_text(folder.path("a.png"), "x")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST_FILE, "a.png"]


KILLED_WRITER = textwrap.dedent("""
    import os, sys
    from m3vit.utils.io import OutputFolder, write_text
    folder = OutputFolder(sys.argv[1], kind="study").__enter__()
    write_text(folder.path("seed-0/a.json"), "first")
    write_text(folder.path("b.json"), "second")
    os.kill(os.getpid(), 9)  # SIGKILL: the block never ends, no clean-up code runs
""")


def test_files_written_before_a_kill_stay_m3vits(tmp_path):
    """A study killed mid-run resumes: what it wrote is recorded as it is written, not only at the end."""
    out = tmp_path / "study"
    writer = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True, text=True)
    assert writer.returncode == -9, writer.stderr
    assert (out / "b.json").read_text() == "second"
    (out / "user.json").write_text("the user's")
    with OutputFolder(out, kind="study") as folder:
        assert folder.owns("seed-0/a.json") and folder.owns("b.json") and not folder.owns("user.json")
        write_text(folder.path("b.json"), "replaced")
        with pytest.raises(OutputError, match="user.json exists and was not written by m3vit"):
            folder.claim(["user.json"])
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["files"] == ["b.json", "seed-0/a.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST_FILE, "b.json", "seed-0", "user.json"])
    with pytest.raises(OutputError, match="holds m3vit study outputs, not infer outputs"):
        with OutputFolder(out, kind="infer"):
            pass


def test_a_killed_writer_of_another_kind_is_still_refused(tmp_path):
    out = tmp_path / "study"
    subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True)
    with pytest.raises(OutputError, match="holds m3vit study outputs, not infer outputs"):
        with OutputFolder(out, kind="infer"):
            pass


LOCK_HOLDER = textwrap.dedent("""
    import sys, time
    from m3vit.utils.io import FolderLock
    FolderLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def test_a_folder_lock_excludes_other_processes_and_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"{tmp_path} is in use by another m3vit process"):
            FolderLock(tmp_path, what="--out").acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs in the holder
        holder.wait()
    with FolderLock(tmp_path):  # the kernel released it
        pass
    assert list(tmp_path.iterdir()) == []  # and no lock file is left behind


def test_write_json_round_trip(tmp_path):
    write_json(tmp_path / "sub" / "x.json", {"a": [1, 2]})
    assert json.loads((tmp_path / "sub" / "x.json").read_text()) == {"a": [1, 2]}


# ----------------------------------------------------------------------------------------------
# Single files the user names: JSON reports and figures
# ----------------------------------------------------------------------------------------------

FORMAT = "m3vit-test-report"


def test_write_report_replaces_only_its_own_format(tmp_path):
    from m3vit.utils.io import write_report

    path = tmp_path / "report.json"
    write_report(path, {"format": FORMAT, "value": 1})
    write_report(path, {"format": FORMAT, "value": 2})  # its own: replaced
    assert json.loads(path.read_text())["value"] == 2
    with pytest.raises(OutputError, match="not a JSON report \\(m3vit-other\\) written by m3vit"):
        write_report(path, {"format": "m3vit-other", "value": 3})  # another kind of report: kept
    assert json.loads(path.read_text())["value"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


@pytest.mark.parametrize("content", [b'{"metrics": {"semseg": {"mIoU": 1.0}}}', b"my notes\n", b"\xff\xfe\x00",
                                     b'["m3vit-test-report"]', b'{"format": 7}', b""])
def test_write_report_refuses_a_file_it_did_not_write(tmp_path, content):
    from m3vit.utils.io import write_report

    path = tmp_path / "report.json"
    path.write_bytes(content)
    with pytest.raises(OutputError, match=f"{path} exists and is not a JSON report"):
        write_report(path, {"format": FORMAT})
    assert path.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_write_report_refuses_a_folder_and_a_link(tmp_path):
    from m3vit.utils.io import write_report

    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputError, match="is a folder"):
        write_report(tmp_path / "dir", {"format": FORMAT})
    target = tmp_path / "target.json"
    write_report(target, {"format": FORMAT, "value": 1})
    (tmp_path / "link.json").symlink_to(target)
    with pytest.raises(OutputError, match="exists and is not"):  # a link is never m3vit's own file
        write_report(tmp_path / "link.json", {"format": FORMAT, "value": 2})
    assert json.loads(target.read_text())["value"] == 1 and (tmp_path / "link.json").is_symlink()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=200),
                         st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=20), st.integers()),
                                         max_size=4).map(lambda d: json.dumps(d).encode()),
                         st.sampled_from([FORMAT, "m3vit-other"]).map(
                             lambda f: json.dumps({"format": f, "x": 1}).encode())))
def test_an_existing_file_is_replaced_only_when_it_is_the_same_report(tmp_path, content):
    from m3vit.utils.io import write_report

    path = tmp_path / "r.json"
    path.write_bytes(content)
    try:
        own = json.loads(content).get("format") == FORMAT
    except (ValueError, AttributeError):
        own = False
    if own:
        write_report(path, {"format": FORMAT, "new": True})
        assert json.loads(path.read_text()) == {"format": FORMAT, "new": True}
    else:
        with pytest.raises(OutputError):
            write_report(path, {"format": FORMAT, "new": True})
        assert path.read_bytes() == content
    path.unlink()


def test_figures_m3vit_saves_are_recognised_and_others_are_not(tmp_path):
    from PIL import Image

    from m3vit.utils.figures import is_m3vit_figure, new_figure, save_figure

    fig = new_figure(1, 1)
    fig.add_subplot().plot([0, 1])
    ours = save_figure(fig, tmp_path / "ours.png")
    assert is_m3vit_figure(ours)
    Image.new("RGB", (4, 4)).save(tmp_path / "theirs.png")
    (tmp_path / "text.png").write_text("not a picture")
    assert not is_m3vit_figure(tmp_path / "theirs.png") and not is_m3vit_figure(tmp_path / "text.png")
    assert not is_m3vit_figure(tmp_path / "missing.png")
