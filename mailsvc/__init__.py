"""mailsvc: a multi-role SMTP mail server on Twisted.

See ``README.md`` for how to run it and ``mailsvc/interfaces.py`` for the
extension points.
"""

__version__ = "0.1.0"
