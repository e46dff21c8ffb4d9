"""The envelope verbs of the command line, with their exit codes."""

import argparse
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.cli import build_parser, main
from tests.test_jmix_roundtrip import make_study

ROOT = Path(__file__).resolve().parents[1]


def pack_a_to_b(t, src, out="e.zip", *extra) -> int:
    """Run ``pack`` from key folder ``a`` to ``b``'s encryption key."""
    argv = ["pack", str(src), "-o", str(t / out), "--from", str(t / "a")]
    return main([*argv, "--to", str(t / "b/encryption.pub"), *extra])


@pytest.fixture
def keyed(tmp_path, capsys):
    """Two key folders made by ``keygen``."""
    for name in ("a", "b", "c"):
        assert main(["keygen", str(tmp_path / name)]) == 0
    out = capsys.readouterr().out
    assert out.count("SHA256:") == 6
    return tmp_path


def test_pack_open_verify_inspect_round_trip(keyed, capsys):
    t = keyed
    src = make_study(t / "src", count=2, PatientName="Secret^Patient")
    (src / "notes.txt").write_text("x")
    assert (
        main(
            [
                "pack",
                str(src),
                "-o",
                str(t / "e.zip"),
                "--from",
                str(t / "a"),
                "--to",
                str(t / "b/encryption.pub"),
                "--dialect",
                "rs",
            ]
        )
        == 0
    )
    assert "skipped 1 files" in capsys.readouterr().out

    reader = ["--key", str(t / "b"), "--trust", str(t / "a/signing.pub")]
    assert main(["verify", str(t / "e.zip"), *reader]) == 0
    assert main(["open", str(t / "e.zip"), "-o", str(t / "out"), *reader]) == 0
    assert len(list((t / "out/dicom").iterdir())) == 2

    assert main(["inspect", str(t / "e.zip"), "--full"]) == 0
    shown = capsys.readouterr().out
    assert "Secret" not in shown
    assert json.loads(shown[shown.index("{") :])["encrypted"] is True


def test_exit_code_3_for_an_untrusted_signer_and_2_for_malformed_input(keyed, capsys):
    t = keyed
    src = make_study(t / "src", count=1)
    pack_a_to_b(t, str(src))
    reader = ["--key", str(t / "b"), "--trust", str(t / "c/signing.pub")]
    assert main(["verify", str(t / "e.zip"), *reader]) == 3
    (t / "junk.zip").write_bytes(b"not a zip")
    assert main(["verify", str(t / "junk.zip"), *reader]) == 2
    assert main(["pack", str(src), "-o", str(t / "x.zip"), "--from", str(t / "a")]) == 2
    err = capsys.readouterr().err
    assert "not pinned" in err and "not a readable zip" in err and "--to" in err


def test_wrong_decryption_key_says_only_authentication_failed(keyed, capsys):
    t = keyed
    pack_a_to_b(t, str(make_study(t / "src", count=1)))
    code = main(
        [
            "open",
            str(t / "e.zip"),
            "-o",
            str(t / "out"),
            "--key",
            str(t / "c"),
            "--trust",
            str(t / "a/signing.pub"),
        ]
    )
    assert code == 3
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("verification failed: authentication failed")
    )
    assert not (t / "out").exists()


ENVELOPE_VERBS = ("keygen", "pack", "open", "verify", "inspect")


def test_help_explains_each_verb(capsys):
    for verb in ENVELOPE_VERBS:
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "usage: jmix-bridge " + verb in capsys.readouterr().out


def test_every_option_of_every_envelope_verb_has_help_text():
    commands = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    silent = [
        f"{verb} {action.option_strings or action.dest}"
        for verb in ENVELOPE_VERBS
        for action in commands.choices[verb]._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert silent == []


# -- as real processes -------------------------------------------------------------


def run_cli(*argv, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    """Run ``python -m bridge`` from the worktree as its own process."""
    return subprocess.run(
        [sys.executable, "-m", "bridge", *map(str, argv)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=120,
    )


@pytest.fixture
def keyed_dirs(tmp_path):
    """Key folders ``a`` (sender), ``b`` (receiver), ``c`` (a stranger)."""
    for name in ("a", "b", "c"):
        assert run_cli("keygen", tmp_path / name).returncode == 0
    return tmp_path


def test_verbs_as_processes_exit_0_2_and_3_with_their_messages(keyed_dirs):
    t = keyed_dirs
    src = make_study(t / "src", count=2, PatientName="Process^Secret")
    packed = run_cli(
        "pack",
        src,
        "-o",
        t / "e.zip",
        "--from",
        t / "a",
        "--to",
        t / "b/encryption.pub",
    )
    assert (packed.returncode, packed.stderr) == (0, "")
    assert "packed 2 instances" in packed.stdout
    reader = ["--key", t / "b", "--trust", t / "a/signing.pub"]

    verified = run_cli("verify", t / "e.zip", *reader)
    opened = run_cli("open", t / "e.zip", "-o", t / "out", *reader)
    inspected = run_cli("inspect", t / "e.zip")
    assert [p.returncode for p in (verified, opened, inspected)] == [0, 0, 0]
    assert verified.stdout.startswith("verified envelope ")
    assert opened.stdout.startswith("opened envelope ")
    assert json.loads(inspected.stdout)["encrypted"] is True
    assert "Secret" not in verified.stdout + opened.stdout + inspected.stdout

    stranger = run_cli(
        "verify", t / "e.zip", "--key", t / "b", "--trust", t / "c/signing.pub"
    )
    wrong_key = run_cli(
        "open",
        t / "e.zip",
        "-o",
        t / "o2",
        "--key",
        t / "c",
        "--trust",
        t / "a/signing.pub",
    )
    assert (stranger.returncode, wrong_key.returncode) == (3, 3)
    assert stranger.stderr.startswith("jmix-bridge: error: verification failed: ")
    assert "not pinned" in stranger.stderr
    assert wrong_key.stderr == (
        "jmix-bridge: error: verification failed: authentication failed\n"
    )
    assert not (t / "o2").exists()

    (t / "junk.zip").write_bytes(b"not a zip")
    junk = run_cli("inspect", t / "junk.zip")
    no_recipient = run_cli("pack", src, "-o", t / "x.zip", "--from", t / "a")
    bad_option = run_cli("verify", t / "e.zip", "--key", t / "b")
    assert [p.returncode for p in (junk, no_recipient, bad_option)] == [2, 2, 2]
    assert "not a readable zip" in junk.stderr
    assert "--to: the recipient's encryption.pub is required" in no_recipient.stderr
    assert "the following arguments are required: --trust" in bad_option.stderr


def test_progress_bar_is_drawn_on_a_terminal_and_not_on_a_pipe(keyed_dirs):
    t = keyed_dirs
    src = make_study(t / "src", count=2)
    argv = ["--from", t / "a", "--to", t / "b/encryption.pub"]

    piped = run_cli("pack", src, "-o", t / "piped.zip", *argv)
    assert piped.returncode == 0
    assert "packing [" not in piped.stderr

    # stderr on the slave side of a pseudo-terminal: isatty() is true there.
    master, slave = pty.openpty()
    try:
        on_tty = run_cli("pack", src, "-o", t / "tty.zip", *argv, stderr=slave)
    finally:
        os.close(slave)
    drawn = read_all(master)
    assert on_tty.returncode == 0
    assert "packing [" in drawn and "100%" in drawn


def read_all(fd: int) -> str:
    """Read what a pseudo-terminal holds until its writers are gone, then close it."""
    chunks = []
    try:
        while data := os.read(fd, 65536):
            chunks.append(data)
    except OSError:
        # Linux reports EIO once the slave side is closed and drained.
        pass
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "replace")
