"""`adtr triton serve` (a local Triton Inference Server for a model repository) and `adtr triton env` (the environment
its Python-backend models run in). Only click at module level; the launcher loads when a command runs.
"""

from __future__ import annotations

import signal
from pathlib import Path

import click

from adtr_deploy.cli.common import user_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def command() -> None:
    """Serve a Triton model repository on this machine, without a container.

    \b
      pip install 'adtr-deploy[triton-server]'      # Triton 2.51 with the Python backend (nvidia-pytriton wheel)
      adtr-export --model RUN --format triton --triton-backend python --out EXPORT
      adtr triton env ~/.adtr-triton-env           # numpy<2 + ONNX Runtime + adtr_deploy for the backend's stub
      adtr triton serve EXPORT/model_repository --python-env ~/.adtr-triton-env
      adtr-run --backend triton --url localhost:8000 --model adtr --source images/ --out results/
    """


@command.command("serve", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("repo", type=click.Path(path_type=Path, file_okay=False))
@click.option("--http-port", type=int, default=8000, show_default=True, help="HTTP/REST (KServe v2) port.")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="gRPC port.")
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Prometheus metrics port (/metrics).")
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Address all three listen on; 0.0.0.0 serves the network (Triton itself has no authentication).",
)
@click.option(
    "--python-env",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="The Python environment of Python-backend models (numpy<2, onnxruntime, adtr_deploy; see `adtr triton env`). "
    "Default: this interpreter's. Checked before the server starts.",
)
@click.option(
    "--server",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="A tritonserver binary. Default: tritonserver on PATH, else the nvidia-pytriton wheel's.",
)
@click.option(
    "--model-control",
    type=click.Choice(["none", "explicit", "poll"]),
    default="none",
    show_default=True,
    help="Triton's model control mode: none loads every model at start; explicit loads only --load-model and what "
    "clients load through the repository API.",
)
@click.option("--load-model", multiple=True, help="With --model-control explicit: a model to load at start ('*': all).")
@click.option("--log-file", type=click.Path(path_type=Path, dir_okay=False), default=None, help="The server's log.")
@click.option("--timeout", "timeout_s", type=float, default=120.0, show_default=True, help="Seconds to wait for ready.")
@user_errors
def serve(
    repo,
    http_port,
    grpc_port,
    metrics_port,
    address,
    python_env,
    server,
    model_control,
    load_model,
    log_file,
    timeout_s,
) -> None:
    """Start tritonserver on REPO (written by adtr-export --format triton), wait until it is ready, and keep it
    running until Ctrl-C or SIGTERM, which stop it gracefully (in-flight requests finish)."""
    from adtr_deploy.runtime.triton_server import TritonServer

    triton = TritonServer(
        repo,
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=metrics_port,
        address=address,
        server=str(server) if server else None,
        python_env=python_env,
        model_control=model_control,
        load_models=tuple(load_model),
        log_file=log_file,
    )
    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signum
        raise KeyboardInterrupt

    # both stop it, also where SIGINT came in ignored (a job started in the background of a script)
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            triton.start(timeout_s)
        except KeyboardInterrupt:
            triton.stop()
            raise SystemExit(0) from None
        env = f"; Python backend: {triton.env_report.prefix}" if triton.env_report else ""
        click.echo(
            f"Triton {triton.version} ready on {repo}: HTTP {triton.http_url}, gRPC {triton.grpc_url}, "
            f"metrics {triton.metrics_url}{env}"
        )
        click.echo(f"  log: {triton.log_path}; Ctrl-C stops it", err=True)
        try:
            code = triton.proc.wait()
        except KeyboardInterrupt:
            click.echo("stopping Triton (in-flight requests finish)...", err=True)
            code = triton.stop()
            click.echo(f"Triton stopped (exit code {code})", err=True)
            return
        reason = triton._failure(f"tritonserver exited by itself with code {code}")
        triton.stop()
        raise click.ClickException(reason)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@command.command("env", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("prefix", type=click.Path(path_type=Path, file_okay=False))
@click.option(
    "--python",
    "python",
    default=None,
    help="The interpreter to base it on (its version must have a stub in the server; default: this one's).",
)
@click.option("--check", is_flag=True, help="Only check an existing environment; change nothing.")
@user_errors
def env(prefix: Path, python: str | None, check: bool) -> None:
    """Make (or check) a Python environment for Triton's Python-backend stub: numpy<2 (Triton 2.51's stub answers
    empty tensors with numpy 2), this ONNX Runtime version, adtr-deploy's requirements, and this adtr_deploy package
    (linked, not copied). Pass it to `adtr triton serve --python-env PREFIX`."""
    from adtr_deploy.runtime.triton_env import make_env, require_env

    report = require_env(prefix) if check else make_env(prefix, python=python, log=lambda m: click.echo(m, err=True))
    versions = ", ".join(f"{k} {v}" for k, v in report.versions.items())
    click.echo(f"{report.prefix}: Python {report.python_version}, {versions}: fit for Triton's Python backend")
