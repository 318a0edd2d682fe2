"""Runnable scenario files shipped with fedopt (see README.md in this folder)."""
