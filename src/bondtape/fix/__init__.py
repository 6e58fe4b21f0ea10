"""FIX 4.4 gateway: a session layer and Trade Capture Report (35=AE) intake (docs/fix.md)."""
from bondtape.fix.server import (
    DEFAULT_COMP_ID,
    FixServer,
    LogonRefused,
    Principal,
    access_authenticator,
    start_fix_server,
    tls_context,
)

__all__ = [
    "DEFAULT_COMP_ID", "FixServer", "LogonRefused", "Principal", "access_authenticator", "start_fix_server",
    "tls_context",
]
