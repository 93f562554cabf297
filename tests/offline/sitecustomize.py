"""Imported by Python at startup in every process the tests start (this folder is on PYTHONPATH)."""

import network_guard

network_guard.guarded(setattr)
