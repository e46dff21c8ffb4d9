"""The hostile-input harness checks what it claims to (issue #9).

:func:`tests.fuzz.envelopes.run_open` is the oracle of the property tests and
of the fuzzer: these tests give it openers that misbehave on purpose and check
that it notices, and feed the fuzzer's seed corpus to its one-input function
without atheris.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from bridge.errors import IntegrityError
from tests.fuzz import fuzz_envelope
from tests.fuzz.envelopes import VECTORS, Escaped, run_open


def _escape_by_open(dest: Path, far: Path) -> None:
    (far / "escaped.txt").write_text("x")


def _escape_by_os_open(dest: Path, far: Path) -> None:
    os.close(os.open(far / "escaped.bin", os.O_WRONLY | os.O_CREAT, 0o600))


def _escape_by_mkdir(dest: Path, far: Path) -> None:
    (far / "escaped").mkdir()


def _escape_by_moving_out(dest: Path, far: Path) -> None:
    dest.mkdir()
    (dest / "f").write_text("x")
    os.rename(dest / "f", far / "moved")


def _escape_by_removing(dest: Path, far: Path) -> None:
    (far / "victim").unlink()


def _escape_from_a_thread(dest: Path, far: Path) -> None:
    worker = threading.Thread(target=_escape_by_open, args=(dest, far))
    worker.start()
    worker.join()


ESCAPES = [
    _escape_by_open,
    _escape_by_os_open,
    _escape_by_mkdir,
    _escape_by_moving_out,
    _escape_by_removing,
    _escape_from_a_thread,
]


@pytest.mark.parametrize("escape", ESCAPES, ids=lambda f: f.__name__[1:])
def test_run_open_notices_a_write_several_levels_above_dest(tmp_path, escape):
    work = tmp_path / "a" / "b" / "c" / "work"
    work.mkdir(parents=True)
    (tmp_path / "victim").write_text("keep")

    def opener(src, dest, **kwargs):
        escape(dest, tmp_path)

    with pytest.raises(Escaped, match="outside dest"):
        run_open(VECTORS / "ok-spec" / "envelope.zip", work, opener=opener)


def test_run_open_notices_a_write_outside_dest_before_a_refusal(tmp_path):
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)

    def opener(src, dest, **kwargs):
        _escape_by_open(dest, tmp_path)
        raise IntegrityError("refused after the harm")

    with pytest.raises(Escaped, match="outside dest"):
        run_open(VECTORS / "ok-spec" / "envelope.zip", work, opener=opener)


def test_run_open_accepts_writes_below_dest_and_in_the_partial_folder(tmp_path):
    work = tmp_path / "work"
    work.mkdir()

    def opener(src, dest, **kwargs):
        partial = dest.parent / f".{dest.name}.x1.partial"
        (partial / "dicom").mkdir(parents=True)
        (partial / "dicom" / "a.dcm").write_bytes(b"x")
        os.rename(partial, dest)

    assert run_open(VECTORS / "ok-spec" / "envelope.zip", work, opener=opener) is None


def test_run_open_of_the_real_opener_writes_nothing_outside_dest(tmp_path):
    work = tmp_path / "a" / "b" / "work"
    work.mkdir(parents=True)
    shutil.copy(VECTORS / "ok-spec" / "envelope.zip", work / "in.zip")

    assert run_open(work / "in.zip", work) is None
    assert (work / "dest" / "files.json").is_file()


@pytest.fixture
def harness_work(tmp_path, monkeypatch):
    """Point the fuzz harness at a fresh folder of this test's."""
    work = tmp_path / "fuzz"
    work.mkdir()
    monkeypatch.setattr(fuzz_envelope, "WORK", work)
    return work


def test_fuzz_harness_runs_every_seed_of_its_corpus(tmp_path, harness_work):
    corpus = tmp_path / "corpus"
    fuzz_envelope.make_corpus(corpus)
    seeds = sorted(corpus.iterdir())

    for seed in seeds:
        fuzz_envelope.test_one_input(seed.read_bytes())

    targets = {seed.read_bytes()[0] for seed in seeds}
    assert targets == {fuzz_envelope.ZIP, fuzz_envelope.SEALED_TAR}.union(
        {fuzz_envelope.JSON, fuzz_envelope.TAR}
    )
    assert len(seeds) > len(list(VECTORS.glob("*/envelope.zip")))
    assert list(harness_work.iterdir()) == []


def test_fuzz_harness_reports_an_escaping_open_as_a_finding(harness_work, monkeypatch):
    def escaping_run_open(src, work):
        return run_open(src, work, opener=lambda s, d, **k: _escape_by_open(d, work))

    monkeypatch.setattr(fuzz_envelope, "run_open", escaping_run_open)
    seed = (
        bytes([fuzz_envelope.ZIP]) + (VECTORS / "ok-spec" / "envelope.zip").read_bytes()
    )

    with pytest.raises(Escaped):
        fuzz_envelope.test_one_input(seed)
