"""`serve`: the aligned model and an index behind a JSON API and a search page (docs/serve.md).

    service = Service("runs/align/tour", "runs/index")  # loaded once, by the checked readers
    app = create_app(service)  # a FastAPI app: /api/..., /images/{row}, the page at /
    serve(service, "127.0.0.1", 8000)  # uvicorn until Ctrl-C

`open_socket` binds before anything is served, so a busy port or a bad host is one line.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable

from stages.serve.app import create_app
from stages.serve.service import Limits, Service
from store import UserError

__all__ = ["Limits", "Service", "create_app", "exposure", "open_socket", "serve"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: resolved by the OS, maybe to a public address
        return False


def exposure(host: str, port: int) -> str | None:
    """What binding `host` exposes, when it is more than this machine; None for loopback."""
    if is_loopback(host):
        return None
    return (
        f"--host {host}: anyone who can reach this machine on port {port} can search and "
        "classify with the model, upload images to it and view every image the index records; "
        "there is no authentication (put a reverse proxy with one in front, or use an SSH tunnel)"
    )


def open_socket(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 lets the OS pick a free one."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as err:
        raise UserError(f"--host {host}: not an address of this machine ({err.strerror})") from err
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({err.strerror}); give another --port or --host"
        ) from err
    return sock


def serve(
    service: Service,
    host: str = "127.0.0.1",
    port: int = 8000,
    echo: Callable[[str], None] = print,
) -> None:
    """Serve `service` with uvicorn until Ctrl-C (or SIGTERM); says where first."""
    import uvicorn

    sock = open_socket(host, port)
    bound = sock.getsockname()[1]
    warning = exposure(host, bound)
    if warning:
        echo(f"warning: {warning}")
    shown = f"[{host}]" if ":" in host else host
    index = service.index
    what = f"index {index.path}, {len(index.rows):,} images" if index else "no index: search off"
    echo(f"serving run {service.run} ({what}) at http://{shown}:{bound}/ (API docs at /docs)")
    config = uvicorn.Config(
        create_app(service), log_level="warning", access_log=False, timeout_keep_alive=30
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.close()
