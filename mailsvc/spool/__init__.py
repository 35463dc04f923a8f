"""The durable UUCP-style queue: C./D. files per next hop, atomic commit,
recovery on start, and the retry schedule.

Everything here is blocking and synchronous, and imports no Twisted: the
caller decides which thread does the I/O.
"""

from mailsvc.spool.filespool import FileSpool, SpoolWriter, check_hop, new_id
from mailsvc.spool.schedule import RetrySchedule

__all__ = ["FileSpool", "RetrySchedule", "SpoolWriter", "check_hop", "new_id"]
