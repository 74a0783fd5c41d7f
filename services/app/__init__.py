"""One entry point, ``build_app(args)``, for `serve run`, serve configs and tests:
``import_path: services.app:build_app``."""


def __getattr__(name: str):
    # Lazy: the deployments import services.app.args, so importing the builder here
    # eagerly would be circular.
    if name == "build_app":
        from .builder import build_app

        return build_app
    raise AttributeError(name)
