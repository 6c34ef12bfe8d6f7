"""Placeholder in the refactor-device branch only: the builders helper's kiosk/device/fetch.py replaces it at merge."""

from kiosk.builders.builders import package_installer  # replaced at merge  # noqa: F401
