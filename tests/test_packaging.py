"""
Packaging: the wheel carries the twistd plugin and never claims Twisted's own
packages (an ``__init__.py`` under ``twisted/`` would overwrite Twisted's file
on install and break every ``twistd`` command once removed).

The wheel is built once per test process with ``pip wheel`` from a copy of the
working tree without build leftovers, so a stale ``build/`` cannot leak files
into it and the tree itself is not written to.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.trial.unittest import FailTest, SynchronousTestCase

PROJECT = Path(__file__).resolve().parent.parent

#: Seconds allowed for ``pip wheel`` (it may fetch setuptools for isolation).
BUILD_TIMEOUT = 180
#: Seconds allowed for a quick pip or Python subprocess.
STEP_TIMEOUT = 60

_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "_trial_temp*",
    ".ci-venv",
    "__pycache__",
    "*.pyc",
    "dropin.cache",
)


def _run(command: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """Run ``command``; raise with its output if it fails."""
    result = subprocess.run(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if result.returncode:
        raise AssertionError(
            f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout}"
        )
    return result


@dataclass(frozen=True)
class _BuiltWheel:
    """A wheel built from the working tree, in a directory of its own."""

    workdir: str
    path: Path
    names: frozenset[str]


@cache
def _build_outcome() -> _BuiltWheel | str:
    """The wheel, or why it could not be built: tried once per test process."""
    try:
        return _build_wheel()
    except (AssertionError, OSError, ValueError, subprocess.SubprocessError) as error:
        return f"building the wheel failed: {error}"


def _built_wheel() -> _BuiltWheel:
    """The wheel built for this test process."""
    outcome = _build_outcome()
    if isinstance(outcome, str):
        raise FailTest(outcome)
    return outcome


def _build_wheel() -> _BuiltWheel:
    """Build the wheel from a clean copy of the tree; its directory goes at exit."""
    workdir = tempfile.mkdtemp(prefix="oemrelay-packaging-")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    source = os.path.join(workdir, "source")
    shutil.copytree(PROJECT, source, ignore=_NOT_SOURCE)
    wheels = os.path.join(workdir, "wheels")
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", wheels, source],
        BUILD_TIMEOUT,
    )
    (path,) = Path(wheels).glob("oemrelay-*.whl")
    with zipfile.ZipFile(path) as wheel:
        names = frozenset(wheel.namelist())
    return _BuiltWheel(workdir, path, names)


class WheelTests(SynchronousTestCase):
    """The built wheel's contents and its plugin."""

    def setUp(self) -> None:
        built = _built_wheel()
        self.workdir = built.workdir
        self.wheel = built.path
        self.names = built.names

    def test_plugin_file_in_wheel(self) -> None:
        """The wheel holds twisted/plugins/oemrelay_plugin.py."""
        self.assertIn("twisted/plugins/oemrelay_plugin.py", self.names)

    def test_every_module_in_wheel(self) -> None:
        """Every oemrelay module of the source tree is in the wheel."""
        modules = {
            path.relative_to(PROJECT).as_posix()
            for path in (PROJECT / "oemrelay").rglob("*.py")
            if "__pycache__" not in path.parts
        }
        self.assertTrue(
            {"oemrelay/__init__.py", "oemrelay/tap.py", "oemrelay/connectors/__init__.py"}
            <= modules
        )
        self.assertEqual(modules - self.names, set())

    def test_no_twisted_package_files(self) -> None:
        """Under twisted/ the wheel holds only the plugin: no __init__.py, no dropin.cache."""
        self.assertNotIn("twisted/__init__.py", self.names)
        self.assertNotIn("twisted/plugins/__init__.py", self.names)
        self.assertEqual(
            {name for name in self.names if name.startswith("twisted/")},
            {"twisted/plugins/oemrelay_plugin.py"},
        )

    def test_installed_wheel_plugin_found(self) -> None:
        """Installed from the wheel, its plugin directory joins twisted.plugins and oemrelay is found."""
        target = os.path.abspath(self.mktemp())
        _run(
            [
                sys.executable, "-m", "pip", "install", "--no-deps", "--no-index",
                "--target", target, str(self.wheel),
            ],
            STEP_TIMEOUT,
        )
        # Twisted extends twisted.plugins.__path__ with every twisted/plugins
        # directory on sys.path that has no __init__.py.  (Which copy of the
        # plugin module wins depends on where Twisted itself is installed, so
        # only the directory and the package it loads are checked.)
        script = (
            "import json, twisted.plugins, oemrelay.tap\n"
            "from twisted.application.service import IServiceMaker\n"
            "from twisted.plugin import getPlugins\n"
            "makers = [m for m in getPlugins(IServiceMaker) if m.tapname == 'oemrelay']\n"
            "print(json.dumps({'path': list(twisted.plugins.__path__),"
            " 'makers': len(makers), 'tap': oemrelay.tap.__file__,"
            " 'options': type(makers[0].options()).__module__}))\n"
        )
        result = _run(
            [sys.executable, "-c", script],
            STEP_TIMEOUT,
            cwd=target,
            env=dict(os.environ, PYTHONPATH=target),
        )
        found = json.loads(result.stdout.splitlines()[-1])
        self.assertIn(os.path.join(target, "twisted", "plugins"), found["path"])
        self.assertGreaterEqual(found["makers"], 1)
        self.assertEqual(found["tap"], os.path.join(target, "oemrelay", "tap.py"))
        self.assertEqual(found["options"], "oemrelay.tap")


class PluginDiscoveryTests(SynchronousTestCase):
    """The plugin as the installed environment sees it."""

    def test_oemrelay_service_maker_found(self) -> None:
        """getPlugins(IServiceMaker) yields a service maker with tapname 'oemrelay'."""
        makers = [maker for maker in getPlugins(IServiceMaker) if maker.tapname == "oemrelay"]
        self.assertGreaterEqual(len(makers), 1)
        self.assertEqual(makers[0].module, "oemrelay.tap")
