"""The base of the error hierarchy, and the errors configuration raises.

It lives here, below everything, so configs never imports the stages; tasks/errors.py
builds the rest of the hierarchy on it.
"""

from __future__ import annotations


class ImagebatchError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(ImagebatchError):
    """Bad settings, flags or registry: a usage error, exit 2."""
