"""``mildnet serve``: Triton Inference Server on a model repository, restarted after a crash, until Ctrl-C or
SIGTERM (see :mod:`mildnet.serving.server`)."""
from __future__ import annotations

import argparse
import os
import signal
import threading

from ..serving.server import ADMIN_KEY_HEADER, RESTRICTED_APIS, TritonServer, parse_cpus, supervise


def _cpus(text: str) -> set[int]:
    try:
        return parse_cpus(text)
    except ValueError as e:  # argparse would otherwise print only "invalid value"
        raise argparse.ArgumentTypeError(str(e)) from None


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", default="model_repository", help="model repository (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--http-port", type=int, default=8000, help="0 picks a free port (default: %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--poll-secs", type=int, default=5,
                        help="re-scan the repository every N s so new exported versions load; 0 = load once")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait until ready")
    parser.add_argument("--log-file", default=None,
                        help="server log (default: <venv>/var/mildnet/triton/logs/...)")
    parser.add_argument("--log-verbose", type=int, default=0)
    parser.add_argument("--cpus", type=_cpus, default=None,
                        help="cores the server may use, e.g. 0-2 (default: all); leave the rest to other services")


def run(args: argparse.Namespace) -> int:
    server = TritonServer(args.repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                          metrics_port=args.metrics_port, log_file=args.log_file,
                          model_control_mode="poll" if args.poll_secs > 0 else "none",
                          poll_secs=max(args.poll_secs, 1), log_verbose=args.log_verbose, cpus=args.cpus)
    stop = threading.Event()

    def _on_signal(signum, _frame):
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start(args.timeout)
        assert server.installation is not None and server.log_file is not None
        key_file = server.log_file.with_name(server.log_file.name + ".admin-key")
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # readable by this user only
        with os.fdopen(fd, "w") as f:
            f.write(server.admin_key + "\n")
        print(f"tritonserver ({server.installation.source}) ready on {server.repository}\n"
              f"  HTTP    http://{server.http_url}\n  gRPC    {server.grpc_url}\n"
              f"  metrics {server.metrics_url}\n  log     {server.log_file}\n"
              f"  {', '.join(RESTRICTED_APIS)} APIs need the header {ADMIN_KEY_HEADER}: {key_file} (mode 0600)\n"
              f"Restarted after a crash; Ctrl-C or SIGTERM stops it.",
              flush=True)
        supervise(server, stop, timeout=args.timeout)
        print("stopping tritonserver ...", flush=True)
        return 0 if server.stop() in (0, None) else 1
    finally:
        server.stop()
        for s, h in previous.items():
            signal.signal(s, h)
