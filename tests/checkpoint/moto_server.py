"""A moto S3 server on 127.0.0.1, on a port the OS picks; prints the port, then serves until killed.

Run by the ``s3_endpoint`` fixture as ``python -m tests.checkpoint.moto_server``. Binding port 0 and
reporting the port (rather than probing for a free one first) leaves no window for a race.
"""

from __future__ import annotations

import signal
import sys

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server


def main() -> None:
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
