"""The shape of the code, checked by import-linter (contracts in pyproject.toml, ``[tool.importlinter]``):
libs never import services, the libs are layered, no service imports another, no import cycles inside a
package. A second test shows the same kind of contract catching a violation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).parents[2]


def test_the_repository_keeps_its_import_contracts(capsys: pytest.CaptureFixture[str]) -> None:
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Contracts: 4 kept, 0 broken." in out


def test_a_lib_importing_a_service_breaks_the_contract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "kitlib").mkdir()
    (tmp_path / "kitlib" / "__init__.py").write_text("import kitsvc.app\n")
    (tmp_path / "kitsvc").mkdir()
    (tmp_path / "kitsvc" / "__init__.py").write_text("")
    (tmp_path / "kitsvc" / "app.py").write_text("X = 1\n")
    config = tmp_path / "contracts.toml"
    config.write_text('[tool.importlinter]\nroot_packages = ["kitlib", "kitsvc"]\n\n'
                      '[[tool.importlinter.contracts]]\nname = "libs never import services"\ntype = "forbidden"\n'
                      'source_modules = ["kitlib"]\nforbidden_modules = ["kitsvc"]\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        code = lint_imports(config_filename=str(config), no_cache=True, no_logo=True)
    finally:
        for name in [m for m in sys.modules if m.startswith(("kitlib", "kitsvc"))]:
            del sys.modules[name]
    out = capsys.readouterr().out
    assert code == 1, out
    assert "kitlib is not allowed to import kitsvc" in out
