"""The POP3 ``-ERR`` texts that carry a response code: login refusals and
failures, a mailbox in use or unavailable, connection limits."""

# rfc2449 8 / rfc3206 response codes in brackets.
AUTH_FAILED = b"[AUTH] Authentication failed"
TOO_MANY_FAILURES = b"[SYS/TEMP] Too many failed logins from your address; try again later"
PLAINTEXT_REFUSED = b"[AUTH] Plaintext login refused before TLS: send STLS first"
SASL_REFUSED = b"[AUTH] Authentication refused before TLS: send STLS first"
IN_USE = b"[IN-USE] mailbox locked: another session is reading it"
MAILBOX_UNAVAILABLE = b"[SYS/TEMP] Cannot open your mailbox now; try again later"
TOO_MANY_CONNECTIONS = b"[SYS/TEMP] Too many connections; try again later"
TOO_MANY_FROM_CLIENT = b"[SYS/TEMP] Too many connections from your address; try again later"
