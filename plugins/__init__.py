"""cometkit's first-party plugins.

Each module here is an ordinary plugin registered through the ``cometkit`` entry-point group,
exactly as a third-party plugin is, and imports only what ``cometkit`` exports publicly.
"""
