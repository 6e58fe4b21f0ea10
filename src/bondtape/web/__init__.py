"""The website, the REST API and the download service: one Starlette application.

``bondtape.web.app.create_app(db, settings)`` builds it from the route modules
``bondtape.web.routes_*`` (each lists ``ROUTES``); ``bondtape.web.routing`` is how a route
declares its access rule.
"""
