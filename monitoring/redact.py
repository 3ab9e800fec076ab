"""Credentials out of every message: URLs with ``user:password@``, ``password=...`` pairs.

A Grafana URL given as ``http://admin:s3cret@grafana:3000``, a broker URL with SASL
credentials or a token in a query string must not reach an error message, a log line or a
traceback. :func:`redact` rewrites a text; :func:`redact_record` a log record (its message
with the arguments merged, and its exception text). The CLI installs the latter as a log
record factory, so every record of every logger (Faust's and aiokafka's included) is
redacted when it is made.

>>> redact("cannot connect to Grafana at http://admin:s3cret@grafana:3000/api: refused")
'cannot connect to Grafana at http://admin:***@grafana:3000/api: refused'
>>> redact("sasl_plain_password='hunter2' token=abc&x=1 Authorization: Bearer eyJhbGci")
'sasl_plain_password=*** token=***&x=1 Authorization: Bearer ***'
>>> redact("http://grafana:3000/d/x?api_key=k3y")
'http://grafana:3000/d/x?api_key=***'
"""

from __future__ import annotations

import logging
import re

__all__ = ["redact", "redact_record"]

# scheme://user:password@host -> scheme://user:***@host (a password may hold ':' or '/')
_URL_USERINFO = re.compile(r"(?P<pre>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*):[^\s@]*@")
# key=value or key: value for secret-sounding keys (quotes around the value included)
_SECRET_KV = re.compile(
    r"(?P<key>\b[\w.-]*(?:password|passwd|pwd|secret|token|api_key|apikey)[\w.-]*)"
    r"(?P<sep>[\"']?\s*[=:]\s*)(?P<val>'[^']*'|\"[^\"]*\"|[^\s&,;'\")\]}]+)",
    re.IGNORECASE,
)
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """``text`` with the password of every URL and the value of every secret-sounding
    ``key=value`` / ``key: value`` pair and ``Bearer``/``Basic`` credential replaced by
    ``***``."""
    text = _URL_USERINFO.sub(r"\g<pre>:***@", text)
    text = _BEARER.sub(r"\1 ***", text)
    return _SECRET_KV.sub(r"\g<key>\g<sep>***", text)


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """Redact ``record`` in place and return it: its message (arguments merged in, so
    ``log.info("at %s", url)`` is covered; a record with nothing to redact keeps its
    arguments for the formatter) and the text of its exception.

    >>> r = logging.LogRecord("x", logging.INFO, "f", 1, "Grafana at %s", ("http://a:b@g",),
    ...                       None)
    >>> redact_record(r).getMessage()
    'Grafana at http://a:***@g'
    """
    try:
        message = record.getMessage()
    except Exception:  # a malformed format: leave it to the formatter to report
        return record
    clean = redact(message)
    if clean != message:  # otherwise the arguments stay for the formatter (Faust's tables)
        record.msg, record.args = clean, ()  # () not None: formatters iterate it
    if record.exc_info and not record.exc_text:
        record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
    return record
