"""Help formatting shared by the ``mmmod`` commands (``demo``, ``plot``)."""
from __future__ import annotations

import argparse


class DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to a flag's help unless the help already states its default or
    there is none to state (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False or action.default == "" \
                or action.default == argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)
