"""moa-plugin-example: a minimal third-party moa plugin providing the "round_robin" router."""

__version__ = "0.1.0"
