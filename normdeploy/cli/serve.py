"""``normdeploy serve OUT_DIR``: a real Triton Inference Server on an output directory (:mod:`normdeploy.serve`)."""
from __future__ import annotations

import click

from .common import SectionedCommand, errors, plain

SERVE_EXAMPLE = """
\b
Example:
  normdeploy optimize models/digits_cnn_bn_un.pt --out out --triton-backend python
  normdeploy serve out                      # HTTP 127.0.0.1:8000, gRPC :8001, metrics :8002
  normdeploy serve out --http-port 0 --grpc-port 0 --metrics-port 0 --json   # free ports, said as JSON
\b
Needs a serving environment (nvidia-pytriton 0.7.0, numpy<2, onnxruntime): scripts/setup_serve.sh
creates .serve-venv, found automatically; or pass --serve-python.
"""


@click.command(cls=SectionedCommand, epilog=SERVE_EXAMPLE)
@click.argument("out_dir", type=click.Path(file_okay=False))
@plain("--address", default="127.0.0.1", show_default=True, section="serve",
       help="Address every port binds to (0.0.0.0 serves other machines too).")
@plain("--http-port", type=click.IntRange(0, 65535), default=8000, show_default=True, section="serve",
       help="HTTP/REST port (0 picks a free one).")
@plain("--grpc-port", type=click.IntRange(0, 65535), default=8001, show_default=True, section="serve",
       help="gRPC port (0 picks a free one).")
@plain("--metrics-port", type=click.IntRange(0, 65535), default=8002, show_default=True, section="serve",
       help="Prometheus metrics port (0 picks a free one).")
@plain("--serve-python", type=click.Path(dir_okay=False), default=None, section="serve",
       help="Python of the serving environment (default: $NORMDEPLOY_SERVE_PYTHON, then .serve-venv, then this one).")
@plain("--start-timeout", type=click.FloatRange(1, 3600), default=120.0, show_default=True, section="serve",
       help="Seconds to wait for the server and its models to be ready.")
@plain("--json", "as_json", is_flag=True, help="Print one JSON line (addresses, models) once ready.")
@plain("--debug", is_flag=True, help="Show tracebacks.")
def serve(out_dir, address, http_port, grpc_port, metrics_port, serve_python, start_timeout, as_json, debug):
    """Serve OUT_DIR (written by `normdeploy optimize`) with Triton Inference Server until Ctrl-C."""
    import sys

    from .. import serve as serving

    with errors(debug):
        code = serving.serve(out_dir, address=address, http_port=http_port, grpc_port=grpc_port,
                             metrics_port=metrics_port, python=serve_python, start_timeout=start_timeout,
                             as_json=as_json, echo=lambda text, err=False: click.echo(text, err=err))
    sys.exit(code)
