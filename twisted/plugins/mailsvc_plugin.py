"""The ``twistd mailsvc`` plugin: all the work is in ``mailsvc.tap``."""

from twisted.application.service import ServiceMaker

mailsvc = ServiceMaker("mailsvc", "mailsvc.tap", "A multi-role mail server: MX, submission, relay, POP3, TURN/ATRN, UUCP.", "mailsvc")
