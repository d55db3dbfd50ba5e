"""Real-time task status over HTTP long polling: aiohttp, with a memory or Redis backend."""
