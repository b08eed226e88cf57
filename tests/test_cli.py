import subprocess
import sys

import merge
from mergeserve import __version__
from mergeserve.cli import main


def test_version_and_help(capsys):
    for argv in (["--version"], ["--help"]):
        try:
            main(argv)
        except SystemExit as e:
            assert e.code == 0
    out = capsys.readouterr().out
    assert __version__ in out and "demo" in out


def test_demo_runs_every_method(capsys):
    assert main(["demo", "--tasks", "2", "--dim", "16"]) == 0
    out = capsys.readouterr().out
    for name in merge.MERGE_METHODS:
        assert name in out


def test_help_of_merge_shows_table():
    out = subprocess.run(
        [sys.executable, "-c", "import merge; help(merge)"],
        capture_output=True,
        text=True,
        env={"PAGER": "cat", "PATH": ""},
        check=True,
    ).stdout
    for fn in [
        "linear",
        "average",
        "ties",
        "dare_linear",
        "dare_ties",
        "magnitude_prune",
        "magmax",
        "tall_masks",
        "pam_align",
        "AdaptiveCoefficients",
    ]:
        assert fn in out
