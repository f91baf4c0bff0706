"""The side-venv helper itself (no engines, nothing from an index): made once, reused while its
requirements file is unchanged, remade when it changes, and a failed install fails loudly."""

from __future__ import annotations

import pytest

from . import sidevenv


def test_made_once_reused_remade_and_a_bad_file_fails_with_the_log(tmp_path):
    reqs, venvs = tmp_path / "reqs", tmp_path / "venvs"
    reqs.mkdir()
    (reqs / "requirements-x.txt").write_text("# nothing to install\n")
    made = sidevenv.ensure("x", requirements_dir=reqs, venvs=venvs)
    assert made.install_s > 0 and made.python.exists()
    run = made.run(["-c", "import sys, sage_nb; print(sys.prefix)"])
    assert run.returncode == 0 and run.stdout.strip() == str(made.path)  # this checkout's sage_nb, in the venv
    assert sidevenv.ensure("x", requirements_dir=reqs, venvs=venvs).install_s == 0

    (reqs / "requirements-x.txt").write_text("this is not == a requirement\n")
    with pytest.raises(sidevenv.SideVenvError, match=r"(?s)failed \(1\).*Invalid requirement"):
        sidevenv.ensure("x", requirements_dir=reqs, venvs=venvs)
    assert not (venvs / "x" / sidevenv.STAMP).exists()  # tried again next time
    with pytest.raises(sidevenv.SideVenvError, match="no requirements file"):
        sidevenv.ensure("y", requirements_dir=reqs, venvs=venvs)
