"""The ``stmdit serve`` web app: app factory (app.py), JSON API (api.py), datasets, guard, static page."""
