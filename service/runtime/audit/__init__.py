"""The delivery audit over HTTP: GET /deliveries (JSON, OpenAPI) and the /ui/ page.

`api.create_audit_app` builds the ASGI app, `paths` lists the exact paths it answers
(FastStream routes by exact path), `report` turns ledger rows into what every view shows.
"""
