"""The envelope verbs of the command line, with their exit codes."""

import json

import pytest

from bridge.cli import main
from tests.test_jmix_roundtrip import make_study


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


def test_help_explains_each_verb(capsys):
    for verb in ("keygen", "pack", "open", "verify", "inspect"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        assert "usage: jmix-bridge " + verb in capsys.readouterr().out
