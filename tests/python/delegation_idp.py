"""A test identity provider and an independent verifier, for
tests/tests/delegation.rs (PyJWT + cryptography, as /usr/bin/python3 has
them from python3-jwt and python3-cryptography).

  delegation_idp.py gen DIR            EC P-256 key -> DIR/idp.pem, DIR/jwks.json (kid idp-1)
  delegation_idp.py sign DIR CLAIMS    prints a token (ES256, typ JWT) over the JSON CLAIMS
  delegation_idp.py verify TOKEN JWKS_URL AUD ISS
                                       fetches the JWKS, verifies with PyJWT, prints
                                       {"header": ..., "claims": ...}
"""

import json
import sys
import urllib.request

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def gen(d):
    key = ec.generate_private_key(ec.SECP256R1())
    with open(f"{d}/idp.pem", "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "idp-1", "use": "sig", "alg": "ES256"})
    with open(f"{d}/jwks.json", "w") as f:
        json.dump({"keys": [jwk]}, f)


def sign(d, claims):
    with open(f"{d}/idp.pem", "rb") as f:
        key = serialization.load_pem_private_key(f.read(), None)
    print(jwt.encode(json.loads(claims), key, algorithm="ES256", headers={"kid": "idp-1"}))


def verify(token, jwks_url, aud, iss):
    with urllib.request.urlopen(jwks_url, timeout=10) as r:
        jwks = json.load(r)
    header = jwt.get_unverified_header(token)
    key = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    pub = jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(key))
    claims = jwt.decode(token, pub, algorithms=["ES256"], audience=aud, issuer=iss)
    print(json.dumps({"header": header, "claims": claims}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "gen":
        gen(sys.argv[2])
    elif cmd == "sign":
        sign(sys.argv[2], sys.argv[3])
    elif cmd == "verify":
        verify(*sys.argv[2:6])
    else:
        sys.exit(f"unknown command {cmd}")
