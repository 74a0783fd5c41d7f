"""The public API over TLS, as a client reaches it through the TLS-terminating ingress
(k8s/components/tls-ingress): `outrider generate --server ... --tls --ca-cert` talks to
a real TLS gRPC server over loopback, checks its certificate, and refuses a plaintext
server or a certificate from another CA."""

import datetime
import json
from concurrent import futures

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.cli.main import main
from services.rpc import outrider_pb2, outrider_pb2_grpc


def self_signed(host: str) -> tuple[bytes, bytes]:
    """(certificate, key) PEM for ``host``, its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    pem_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), pem_key


class EchoOutrider(outrider_pb2_grpc.OutriderServicer):
    """Three tokens and the final stats, whatever is asked: the transport is under test."""

    def Generate(self, request, context):
        yield outrider_pb2.GenerateChunk(request_id=request.request_id, token_ids=[5, 6, 7], text="abc")
        yield outrider_pb2.GenerateChunk(request_id=request.request_id, prompt_token_ids=[1, 2],
                                         stats=outrider_pb2.GenerationStats(emitted=3, rounds=1))


@pytest.fixture
def tls_server(tmp_path):
    cert, key = self_signed("localhost")
    server = grpc.server(futures.ThreadPoolExecutor(2))
    outrider_pb2_grpc.add_OutriderServicer_to_server(EchoOutrider(), server)
    port = server.add_secure_port("localhost:0", grpc.ssl_server_credentials([(key, cert)]))
    server.start()
    (tmp_path / "ca.pem").write_bytes(cert)
    (tmp_path / "other.pem").write_bytes(self_signed("localhost")[0])
    yield f"localhost:{port}", tmp_path
    server.stop(0)


def generate(address, *extra):
    return main(["generate", "def f():", "--server", address, "--max-new-tokens", "3", "--json", *extra])


def test_generate_reaches_a_tls_server_and_checks_its_certificate(tls_server, capsys):
    address, certs = tls_server
    assert generate(address, "--tls", "--ca-cert", str(certs / "ca.pem")) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"][0]["token_ids"] == [5, 6, 7] and out["prompt_token_ids"] == [1, 2]

    for extra in ([], ["--tls", "--ca-cert", str(certs / "other.pem")]):  # plaintext; a certificate from another CA
        with pytest.raises(SystemExit) as exit:
            generate(address, *extra)
        assert exit.value.code == 2
        assert "UNAVAILABLE" in capsys.readouterr().err


def test_a_ca_cert_without_tls_or_unreadable_is_a_usage_error(tls_server, capsys):
    address, certs = tls_server
    for extra, message in ((["--ca-cert", str(certs / "ca.pem")], "--ca-cert needs --tls"),
                           (["--tls", "--ca-cert", str(certs / "missing.pem")], "--ca-cert:")):
        with pytest.raises(SystemExit) as exit:
            generate(address, *extra)
        assert exit.value.code == 2 and message in capsys.readouterr().err
