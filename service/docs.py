"""The API's own documentation, /docs (Swagger UI) and /openapi.json, served whole by the service.

Swagger UI's files come from the pinned flask-swagger-ui package (its dist/ folder is the
upstream swagger-ui-dist of the same version; nothing else of the package is used) and are
served under /docs/assets/: the page loads nothing from a CDN and works with no internet.

The document's `servers` is PUBLIC_URL, or absent (Swagger UI then calls the origin it was loaded
from); never the requesting Host, which APIFlask's AUTO_SERVERS would put there and every worker
would cache for life, sending "Try it out" (and the token typed into it) wherever the first
caller's Host pointed. In production both routes are off unless DOCS_ENABLED=1: create_app passes
`enable_openapi`, and this module then registers nothing.
"""

from __future__ import annotations

from pathlib import Path

from apiflask import APIBlueprint, APIFlask

from service.settings import Settings

ASSETS_PATH = "/docs/assets"
# The files the page loads, by the APIFlask setting that names each.
ASSETS = {
    "SWAGGER_UI_CSS": "swagger-ui.css",
    "SWAGGER_UI_BUNDLE_JS": "swagger-ui-bundle.js",
    "SWAGGER_UI_STANDALONE_PRESET_JS": "swagger-ui-standalone-preset.js",
    "DOCS_FAVICON": "favicon-32x32.png",
}


def swagger_ui_dist() -> Path:
    import flask_swagger_ui

    return Path(flask_swagger_ui.__file__).parent / "dist"


def init_app(app: APIFlask, settings: Settings) -> None:
    app.config.update(
        AUTO_SERVERS=False,
        SERVERS=[{"url": settings.public_url}] if settings.public_url else None,
    )
    if not settings.docs_enabled:
        return
    assets = APIBlueprint(
        "docs_assets",
        __name__,
        enable_openapi=False,
        static_folder=str(swagger_ui_dist()),
        static_url_path=ASSETS_PATH,
    )
    app.register_blueprint(assets)
    app.config.update({setting: f"{ASSETS_PATH}/{name}" for setting, name in ASSETS.items()})
    # No validator badge: Swagger UI would send the document's URL to validator.swagger.io.
    app.config["SWAGGER_UI_CONFIG"] = {"validatorUrl": None}
