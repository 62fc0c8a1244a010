"""py-spiffe (the `spiffe` package on PyPI) against real Sigil binaries.

Starts sigil-server and sigil-agent from SIGIL_BIN_DIR (default:
<repo>/target/debug), registers the current uid, and fetches the X.509-SVID
with py-spiffe's WorkloadApiClient, as any Python workload would.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from spiffe import WorkloadApiClient
from spiffe.workloadapi.errors import FetchX509SvidError, ValidateJwtSvidError

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("SIGIL_BIN_DIR", REPO / "target" / "debug"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, fn, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if fn():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class Cluster:
    def __init__(self, extra_config=""):
        self.dir = Path(tempfile.mkdtemp(prefix="sigil-py-"))
        self.port = free_port()
        self.env = dict(os.environ, SIGIL_ADMIN_SOCKET=str(self.dir / "admin" / "admin.sock"))
        (self.dir / "server.toml").write_text(
            f'trust_domain = "example.org"\nbind_port = {self.port}\n'
            f'data_dir = "{self.dir}/server"\nadmin_socket = "{self.dir}/admin/admin.sock"\n'
            + extra_config
        )
        self.procs = []
        self.procs.append(self._spawn(["sigil-server", "run", "--config", str(self.dir / "server.toml")], "server.log"))
        wait_for("server", lambda: self.cli("healthcheck", check=False).returncode == 0)
        (self.dir / "bundle.pem").write_text(self.cli("bundle", "show").stdout)
        token = json.loads(self.cli("token", "generate", "--spiffe-id", "spiffe://example.org/py-agent", "--output", "json").stdout)["value"]
        (self.dir / "agent.toml").write_text(
            f'trust_domain = "example.org"\nserver_address = "127.0.0.1"\nserver_port = {self.port}\n'
            f'socket_path = "{self.dir}/agent/public/api.sock"\nadmin_socket = "{self.dir}/agent/private/admin.sock"\n'
            f'data_dir = "{self.dir}/agent/data"\ntrust_bundle_path = "{self.dir}/bundle.pem"\n'
        )
        self.procs.append(self._spawn(["sigil-agent", "run", "--config", str(self.dir / "agent.toml"), "--join-token", token], "agent.log"))
        self.socket = self.dir / "agent" / "public" / "api.sock"
        wait_for("agent", lambda: subprocess.run(
            [str(BIN / "sigil-agent"), "healthcheck", "--admin-socket", str(self.dir / "agent" / "private" / "admin.sock")],
            capture_output=True).returncode == 0)

    def _spawn(self, argv, log):
        return subprocess.Popen([str(BIN / argv[0])] + argv[1:], stdout=subprocess.DEVNULL,
                                stderr=open(self.dir / log, "ab"), env=self.env)

    def cli(self, *args, check=True):
        r = subprocess.run([str(BIN / "sigil-server"), *args], capture_output=True, text=True, env=self.env)
        if check and r.returncode != 0:
            raise AssertionError(f"sigil-server {args}: {r.stderr}")
        return r

    def close(self):
        for p in reversed(self.procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def cluster():
    c = Cluster()
    yield c
    c.close()


def fetch_when_ready(client, want, timeout=15.0):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            svid = client.fetch_x509_svid()
            if str(svid.spiffe_id) == want:
                return svid
            last = str(svid.spiffe_id)
        except FetchX509SvidError as e:
            last = e
        time.sleep(0.1)
    raise AssertionError(f"never fetched {want}; last: {last}")


def test_py_spiffe_fetches_the_x509_svid(cluster):
    uid = os.geteuid()
    cluster.cli("entry", "create", "--parent-id", "spiffe://example.org/py-agent",
                "--spiffe-id", "spiffe://example.org/py-workload", "--selector", f"unix:uid:{uid}",
                "--x509-ttl", "5m", "--hint", "py")
    with WorkloadApiClient(f"unix://{cluster.socket}", default_timeout=10) as client:
        svid = fetch_when_ready(client, "spiffe://example.org/py-workload")
        assert str(svid.spiffe_id.trust_domain) == "example.org"
        leaf = svid.leaf
        lifetime = leaf.not_valid_after_utc.timestamp() - time.time()
        assert 250 < lifetime <= 305, lifetime
        assert isinstance(svid.private_key, ec.EllipticCurvePrivateKey)
        assert svid.private_key.public_key().public_numbers() == leaf.public_key().public_numbers()

        ctx = client.fetch_x509_context()
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        assert bundle is not None
        (ca,) = bundle.x509_authorities
        # The leaf is signed by the bundle's CA.
        leaf.verify_directly_issued_by(ca)


def test_py_spiffe_sees_permission_denied_without_an_entry(cluster):
    other = os.geteuid() + 1
    cluster.cli("entry", "create", "--parent-id", "spiffe://example.org/py-agent",
                "--spiffe-id", "spiffe://example.org/someone-else", "--selector", f"unix:uid:{other}")
    time.sleep(0.5)
    with WorkloadApiClient(f"unix://{cluster.socket}", default_timeout=10) as client:
        with pytest.raises(FetchX509SvidError) as err:
            client.fetch_x509_svid()
        cause = err.value.__cause__
        assert isinstance(cause, grpc.RpcError), repr(cause)
        assert cause.code() == grpc.StatusCode.PERMISSION_DENIED


def test_py_spiffe_fetches_and_validates_a_jwt_svid(cluster):
    uid = os.geteuid()
    cluster.cli("entry", "create", "--parent-id", "spiffe://example.org/py-agent",
                "--spiffe-id", "spiffe://example.org/py-jwt", "--selector", f"unix:uid:{uid}",
                "--jwt-ttl", "90s")
    with WorkloadApiClient(f"unix://{cluster.socket}", default_timeout=10) as client:
        deadline = time.time() + 15
        while True:
            try:
                jwt_svid = client.fetch_jwt_svid(audience={"py-audience"})
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        assert str(jwt_svid.spiffe_id) == "spiffe://example.org/py-jwt"
        assert "py-audience" in jwt_svid.audience
        assert 60 < jwt_svid.expiry - time.time() <= 91

        bundles = client.fetch_jwt_bundles()
        bundle = bundles.get_bundle_for_trust_domain(jwt_svid.spiffe_id.trust_domain)
        assert bundle is not None and bundle.jwt_authorities

        # Verify the signature ourselves with the bundle's key, as a service would.
        import jwt as pyjwt
        kid = pyjwt.get_unverified_header(jwt_svid.token)["kid"]
        key = bundle.jwt_authorities[kid]
        claims = pyjwt.decode(jwt_svid.token, key=key, algorithms=["ES256"], audience="py-audience")
        assert claims["sub"] == "spiffe://example.org/py-jwt"

        validated = client.validate_jwt_svid(jwt_svid.token, "py-audience")
        assert str(validated.spiffe_id) == "spiffe://example.org/py-jwt"
        with pytest.raises(ValidateJwtSvidError):
            client.validate_jwt_svid(jwt_svid.token, "another-audience")


def test_oidc_discovery_lets_pyjwt_verify_a_jwt_svid():
    """An off-the-shelf verifier (PyJWT + its JWKS client) accepts RS256
    JWT-SVIDs through the server's OIDC discovery document."""
    import urllib.request
    import jwt as pyjwt

    oidc_port = free_port()
    issuer = f"http://127.0.0.1:{oidc_port}"
    # RS256 keys here (ES256 is the default and is covered above).
    c = Cluster(f'jwt_key_type = "rsa-2048"\n\n[oidc]\nport = {oidc_port}\nissuer = "{issuer}"\n')
    try:
        c.cli("entry", "create", "--parent-id", "spiffe://example.org/py-agent",
              "--spiffe-id", "spiffe://example.org/oidc-client", "--selector", f"unix:uid:{os.geteuid()}")
        with WorkloadApiClient(f"unix://{c.socket}", default_timeout=10) as client:
            deadline = time.time() + 15
            while True:
                try:
                    token = client.fetch_jwt_svid(audience={"https://api.example.org"}).token
                    break
                except Exception:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.1)
        with urllib.request.urlopen(f"{issuer}/.well-known/openid-configuration", timeout=10) as r:
            discovery = json.load(r)
        assert discovery["issuer"] == issuer
        assert discovery["id_token_signing_alg_values_supported"] == ["RS256"]
        jwks_client = pyjwt.PyJWKClient(discovery["jwks_uri"])
        key = jwks_client.get_signing_key_from_jwt(token)
        claims = pyjwt.decode(token, key.key, algorithms=discovery["id_token_signing_alg_values_supported"],
                              audience="https://api.example.org", issuer=issuer)
        assert claims["sub"] == "spiffe://example.org/oidc-client"
        with pytest.raises(pyjwt.InvalidAudienceError):
            pyjwt.decode(token, key.key, algorithms=["RS256"], audience="https://other.example.org", issuer=issuer)
    finally:
        c.close()
