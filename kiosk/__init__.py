"""kiosk: a declarative, git push-to-deploy appliance builder for Raspberry Pi 0-4."""

__version__ = "0.1.0"
