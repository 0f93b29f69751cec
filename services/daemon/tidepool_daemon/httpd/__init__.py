"""The daemon's own small HTTP/1.1 and WebSocket layer (standard library only): the threaded server,
the router, request/response bodies, multipart and WebSocket framing. It knows no route: see `routes.py`.
"""
