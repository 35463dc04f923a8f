"""The ``twistd mailsvc`` plugin: all the work is in ``mailsvc.tap``."""

from twisted.application.service import ServiceMaker

mailsvc = ServiceMaker("mailsvc", "mailsvc.tap", "A multi-role SMTP mail server (MX, spool, local delivery).", "mailsvc")
