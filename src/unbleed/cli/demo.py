"""``unbleed demo``: the browser demo (Gradio, :mod:`unbleed.demo`) on one model, loaded once and kept."""

from __future__ import annotations

import errno
import importlib.util
import signal
import socket
from typing import Annotated

import typer

from .. import checks
from ..errors import UnbleedError
from .common import AllowPickle, Device, Dtype, Model, Scheduler, command, err, quiet_libraries


def check_port(host: str, port: int) -> None:
    """Fail before the model loads when ``host:port`` cannot be served (taken, or not an address of this machine)."""
    if not 0 < port < 65536:
        raise UnbleedError(f"--port {port} must be from 1 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UnbleedError(f"--host {host!r} is not an address ({e.strerror}): use 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise UnbleedError(f"--port {port} is in use on {host}: choose another port") from None
            raise UnbleedError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); use "
                               f"127.0.0.1 or 0.0.0.0 and a free port") from None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@command()
def demo(
    model: Model = "shapes",
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface; the page "
                                                     "then answers anyone who can reach this machine).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 7860,
    scheduler: Scheduler = "default",
    device: Device = "auto",
    dtype: Dtype = "auto",
    allow_pickle: AllowPickle = False,
) -> None:
    """Serve the browser demo: a prompt, its parse, methods × seeds (with the shapes detector's verdicts), an
    attention viewer, loss traces, PNG and zip downloads."""
    # the flags that need no model, checked before torch and diffusers load (unbleed.checks)
    checks.given(model, "--model", "name a model, e.g. --model shapes")
    checks.scheduler(scheduler)
    checks.device(device)
    checks.dtype(dtype)
    if importlib.util.find_spec("gradio") is None:
        raise UnbleedError("unbleed demo needs gradio: run ./setup.sh, or pip install 'unbleed[demo]'")
    check_port(host, port)

    from .. import models

    quiet_libraries()
    with err.status(f"loading model {model}…"):
        pipe = models.load_model(model, device=device, dtype=dtype, allow_pickle=allow_pickle, scheduler=scheduler)
    from ..demo import build_app, serve

    app = build_app(pipe, model)  # error lines name the page's controls, not flags
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    err.print(f"unbleed demo: model {model}, serving http://{shown}:{port} (Ctrl-C stops)", highlight=False,
              soft_wrap=True)
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop closes the server as Ctrl-C does
    serve(app, host=host, port=port)
    err.print("unbleed demo: stopped", highlight=False)


__all__ = ["demo", "check_port"]
