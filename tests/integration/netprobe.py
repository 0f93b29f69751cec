"""Tiny stdlib-only scripts for network tests: servers that answer "ok", and a probe that says how each
connection attempt ended: "ok" (the server's answer; "connected" for kind "connect", any TCP server),
"refused", "timeout", or the errno name such as "EHOSTUNREACH". Targets are [kind, host, port] with kind
"tcp", "udp" (our servers) or "connect".
They run in network namespaces and inside sandboxes (any python3)."""

from __future__ import annotations

SERVER = r"""
import json, socket, sys, threading
def serve_tcp(sock):
    while True:
        conn, _ = sock.accept()
        conn.sendall(b"ok")
        conn.close()
def serve_udp(sock):
    while True:
        _, peer = sock.recvfrom(64)
        sock.sendto(b"ok", peer)
for kind, host, port in json.loads(sys.argv[1]):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((host, port))
    if kind == "tcp":
        sock.listen(16)
    threading.Thread(target=serve_tcp if kind == "tcp" else serve_udp, args=(sock,), daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""

PROBE = r"""
import errno, json, socket, sys
results = []
for kind, host, port in json.loads(sys.argv[1]):
    try:
        family, socktype, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)[0]
        with socket.socket(family, socktype) as sock:
            sock.settimeout(float(sys.argv[2]))
            sock.connect(address)
            if kind == "connect":  # any TCP server: a completed handshake is enough
                results.append("connected")
                continue
            if kind == "udp":
                sock.send(b"?")
            results.append("ok" if sock.recv(2) == b"ok" else "closed")
    except ConnectionRefusedError:
        results.append("refused")
    except TimeoutError:
        results.append("timeout")
    except OSError as error:
        results.append(errno.errorcode.get(error.errno, str(error)))
print(json.dumps(results))
"""

# A blocked TCP connect is answered with a reset; a blocked UDP datagram with ICMP "prohibited".
BLOCKED_TCP = "refused"
BLOCKED_UDP = "EHOSTUNREACH"
