"""Imports every capability's tables so that their migrations are registered."""
from bondtape.reference import schema as _reference  # noqa: F401
from bondtape.journal import schema as _journal  # noqa: F401
from bondtape.access import schema as _access  # noqa: F401
from bondtape.fix import schema as _fix  # noqa: F401
from bondtape.dissemination import schema as _dissemination  # noqa: F401
from bondtape.fees import schema as _fees  # noqa: F401
from bondtape.web import schema as _web  # noqa: F401
from bondtape.historic import schema as _historic  # noqa: F401
