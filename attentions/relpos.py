"""Relative-position tables, written once: Swin's windowed bias table,
MViTv2's decomposed tables and DAT's continuous bias table."""

from __future__ import annotations
