"""The OpenAI-compatible HTTP server (``lanner serve``): see ``app.create_app``.

Importing this package needs FastAPI; ``import lanner`` never imports it.
"""
