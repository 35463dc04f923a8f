"""mailsvc's built-in plugins: the maildir and mbox stores, the config directory."""

from mailsvc.directory import ConfigDirectoryFactory
from mailsvc.store.maildir import MaildirStoreFactory
from mailsvc.store.mbox import MboxStoreFactory

maildirStore = MaildirStoreFactory()
mboxStore = MboxStoreFactory()
configDirectory = ConfigDirectoryFactory()
