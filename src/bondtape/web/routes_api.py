"""The REST API's routes (``bondtape.web.api``), collected by the app factory."""
from bondtape.web.api import ROUTES

__all__ = ["ROUTES"]
