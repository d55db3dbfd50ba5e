"""Typed application keys, in one place."""

from __future__ import annotations

from aiohttp import web

from .backend import Backend
from .config import Config
from .hub import Hub

CONFIG = web.AppKey("config", Config)
HUB = web.AppKey("hub", Hub)
BACKEND = web.AppKey("backend", Backend)
