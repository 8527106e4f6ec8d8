"""A converted dataset in an object store: `tlkit convert` writes to s3://, `tlkit finetune`
trains from it, both through LitData's own S3 code (boto3 for metadata, obstore for chunks),
against moto's S3 emulator served over HTTPS on localhost.

HTTPS because LitData 0.2.76 builds its obstore client with fixed client options, which drop
obstore's AWS_ALLOW_HTTP: a plain-http endpoint fails there ("builder error: BadScheme"). The
emulator's certificate is issued by a throw-away CA that boto3 (AWS_CA_BUNDLE) and obstore
(SSL_CERT_FILE) are told to trust, as a private S3-compatible store would be configured.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import litdata
import pytest
import pytorch_lightning as pl
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from litdata.processing import data_processor
from moto.server import DomainDispatcherApplication, create_backend_app  # dev extras
from werkzeug.serving import make_server

from tests.conftest import TINY_CONFIG
from tlkit.cli import main
from tlkit.config import FinetuneConfig
from tlkit.data import shards
from tlkit.data.shards import MARKER, convert, open_converted
from tlkit.train.finetune import finetune

BUCKET = "tlkit-test"


def _write_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate for localhost/127.0.0.1 that it signed: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = dict(not_valid_before=now - datetime.timedelta(hours=1))
    valid["not_valid_after"] = now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tlkit test CA")])
    ca = (
        x509.CertificateBuilder(issuer_name=ca_name, subject_name=ca_name, **valid)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder(
            issuer_name=ca_name,
            subject_name=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]),
            **valid,
        )
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture(scope="module")
def s3_bucket(tmp_path_factory) -> Iterator[str]:
    """s3://BUCKET on moto's S3 emulator (HTTPS, a free localhost port), with the AWS_*
    variables boto3 and obstore read pointing at it; the emulator stops afterwards."""
    ca, certificate, key = _write_certificates(tmp_path_factory.mktemp("tls"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    # moto's ThreadedMotoServer serves plain http only; this is its set-up plus TLS.
    server = make_server(
        "127.0.0.1",
        0,
        DomainDispatcherApplication(create_backend_app),
        threaded=True,
        ssl_context=context,
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    environment = {
        "AWS_ENDPOINT_URL": f"https://127.0.0.1:{server.socket.getsockname()[1]}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CA_BUNDLE": str(ca),  # boto3
        "SSL_CERT_FILE": str(ca),  # obstore (rustls)
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    server.shutdown()
    thread.join()


class SeenLabels(pl.Callback):
    """The labels of every training batch and the number of test images, as the model saw them."""

    def __init__(self) -> None:
        self.train_labels: list[int] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        self.train_labels += batch[1].tolist()


def test_convert_to_s3_and_finetune_from_it(s3_bucket, colour_folder, tmp_path, capsys):
    url = f"{s3_bucket}/colours"
    arguments = [str(colour_folder), url, "--workers", "1", "--val-fraction", "0.3"]
    assert main(["convert", *arguments]) == 0
    assert "converted" in capsys.readouterr().out
    keys = {item["Key"] for item in boto3.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert {f"colours/{MARKER}", "colours/train/index.json", "colours/test/index.json"} <= keys
    converted = open_converted(url)
    assert converted is not None and converted.location == url
    counts = converted.counts
    assert sum(counts.values()) == 42  # colour_folder: 30 train/ + 12 test/ images

    seen = SeenLabels()
    config = FinetuneConfig(
        data_dir=url,
        out=str(tmp_path / "run"),
        epochs=1,
        backbone="test_efficientnet",  # timm's tiny test model: the data is what is tested
        **{**TINY_CONFIG, "pretrained": "none", "batch_size": 10},  # 20 images: two batches
    )
    summary = finetune(config, callbacks=[seen], enable_progress_bar=False)
    assert (summary.train_images, summary.val_images, summary.test_images) == (
        counts["train"],
        counts["val"],
        counts["test"],
    )
    assert summary.test_acc is not None  # evaluated on the test split, read from the store
    assert len(seen.train_labels) == counts["train"]
    labels = [label for _, label in converted.samples()["train"]]
    assert sorted(seen.train_labels) == sorted(labels)
    # LitData's chunk cache (a folder per split's URL): in the run folder's cache, not in the
    # home folder's ~/.lightning/chunks.
    folders = {hashlib.md5(f"{url}/{split}".encode()).hexdigest() for split in counts}
    cache = tmp_path / "run" / "cache" / "shards"
    assert {path.name for path in cache.iterdir()} == folders
    default_cache = Path.home() / ".lightning" / "chunks"  # absent on a fresh machine
    assert not default_cache.is_dir() or not folders & set(os.listdir(default_cache))


def test_each_conversion_stages_its_chunks_in_its_own_folder(colour_folder, tmp_path, monkeypatch):
    """litdata.optimize stages chunks in one machine-wide folder that it empties when it
    starts: two conversions at once would delete each other's chunks."""
    shared = tmp_path / "shared-staging"
    monkeypatch.setenv("DATA_OPTIMIZER_CACHE_FOLDER", str(shared))
    staging: list[str] = []
    real_optimize = litdata.optimize

    def optimize(*args, **kwargs):
        staging.append(data_processor._get_cache_dir())
        return real_optimize(*args, **kwargs)

    monkeypatch.setattr(shards.litdata, "optimize", optimize)
    convert(colour_folder, tmp_path / "out", workers=1, progress=False)
    assert len(set(staging)) == 3 and str(shared) not in staging  # train, val, test
    assert not any(os.path.exists(folder) for folder in staging)  # removed afterwards
    assert os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] == str(shared)
