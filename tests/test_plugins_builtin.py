"""The built-in plugins are found by twisted.plugin.getPlugins, as start-up finds them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Run in a fresh interpreter with the repository root on sys.path (where the
# editable install puts it), so discovery does not depend on what this test
# process imported before.
DISCOVER = """
import json
from twisted.plugin import getPlugins
from mailsvc.interfaces import IMailboxStoreFactory, IRecipientDirectoryFactory
from zope.interface.verify import verifyObject
found = {}
for interface in (IMailboxStoreFactory, IRecipientDirectoryFactory):
    plugins = list(getPlugins(interface))
    for plugin in plugins:
        verifyObject(interface, plugin)
    found[interface.__name__] = sorted(p.name for p in plugins)
print(json.dumps(found))
"""


def discover() -> dict[str, list[str]]:
    """The plugin names getPlugins finds, per interface, in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", DISCOVER], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_pluginFolderHasNoInitFiles():
    """twisted/ and twisted/plugins/ must not be packages, or they would hide Twisted's own."""
    assert (REPO / "twisted" / "plugins" / "mailsvc_builtins.py").is_file()
    assert not (REPO / "twisted" / "__init__.py").exists()
    assert not (REPO / "twisted" / "plugins" / "__init__.py").exists()


def test_getPluginsFindsBuiltins():
    """getPlugins finds the maildir and mbox stores and the config directory."""
    found = discover()
    assert {"maildir", "mbox"} <= set(found["IMailboxStoreFactory"])
    assert "config" in found["IRecipientDirectoryFactory"]


def test_pluginModuleObjects():
    """The plugin module holds one instance of each built-in factory."""
    from mailsvc.directory import ConfigDirectoryFactory
    from mailsvc.store.maildir import MaildirStoreFactory
    from mailsvc.store.mbox import MboxStoreFactory

    namespace: dict = {}
    path = REPO / "twisted" / "plugins" / "mailsvc_builtins.py"
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    assert isinstance(namespace["maildirStore"], MaildirStoreFactory)
    assert isinstance(namespace["mboxStore"], MboxStoreFactory)
    assert isinstance(namespace["configDirectory"], ConfigDirectoryFactory)
