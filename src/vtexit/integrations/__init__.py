"""Bridges to other tools (lmms-eval). Nothing here is imported by vtexit's core: each module imports its tool."""
