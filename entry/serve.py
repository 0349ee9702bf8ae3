"""`mlflow run . -e serve -P model=NAME@ALIAS`: check a registered model's files against the
registry, then answer requests with MLflow's scoring server, from the copy just checked."""

import sys
import tempfile

import click

from entry.options import command, run
from ttkd import predict
from ttkd.errors import TTKDError
from ttkd.tracking import registry


@command("serve")
@click.option("--model", required=True, help="the model: NAME, NAME@ALIAS, NAME/VERSION, models:/... or runs:/...")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="the address to listen on; 0.0.0.0 answers every network this machine is on")
@click.option("--port", type=click.IntRange(1, 65535), default=5001, show_default=True)
@click.option("--trust_unverified", type=click.BOOL, default=False, show_default=True,
              help="serve a model whose files the registry holds no SHA-256 record of, as it is")
def main(model, host, port, trust_unverified):
    """Serve MODEL on http://HOST:PORT/invocations (uint8 images in, classes out), after
    checking every file of it against the digests recorded when it was registered."""
    import uvicorn

    registry.prepare_store()
    ref = registry.resolve(model)
    with tempfile.TemporaryDirectory(prefix="ttkd-serve-") as tmp:
        app, warning = predict.scoring_app(ref, tmp, trust_unverified)
        if warning:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        print(f"serving {ref.uri}, its files checked, on http://{host}:{port}/invocations", flush=True)
        try:
            uvicorn.run(app, host=host, port=port, log_level="warning")
        except OSError as exc:
            raise TTKDError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another port") from None


if __name__ == "__main__":
    run(main)
