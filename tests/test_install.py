"""The library installs as a package: ``pip install .`` makes ``ner_compress`` importable from anywhere."""
import os
import shutil
import subprocess
import sys

from conftest import ROOT


def test_pip_install_puts_every_subpackage_on_the_path_with_the_pinned_dependencies(tmp_path):
    source, site = tmp_path / "source", tmp_path / "site"  # a copy: building writes build/ and egg-info beside it
    shutil.copytree(os.path.join(ROOT, "ner_compress"), source / "ner_compress",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                            str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    code = ("import importlib, ner_compress, pkgutil\n"
            "print(ner_compress.__file__)\n"
            "print(sorted(m.name for m in pkgutil.iter_modules(ner_compress.__path__)))\n"
            "import ner_compress.serve.__main__\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    installed, packages = run.stdout.splitlines()[:2]
    assert installed.startswith(str(site))  # not the checkout
    assert packages == str(["commands", "compress", "core", "data", "deploy", "measure", "models", "serve"])
    metadata = next(site.glob("ner_compress-*.dist-info")) / "METADATA"
    requires = {line.split(": ", 1)[1] for line in metadata.read_text().splitlines() if line.startswith("Requires-Dist")}
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as fh:
        pinned = {line.strip() for line in fh if line.strip() and not line.startswith("#")}
    assert {r.replace(" ", "") for r in requires} == {p.replace(" ", "") for p in pinned}
