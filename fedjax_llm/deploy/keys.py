"""Each party's keys in a directory of its own: `fedjax-llm-keys init` writes them, a deployed process
loads only its own and refuses to start with anything that would let it speak for another party.

    fedjax-llm-keys init --parties east,central,west,aggregator --out DIR [--tls]

DIR/<party>/ holds that party's private keys (`<party>.sign.pem`, `<party>.kex.pem`, mode 0600) and the
shared trust list `trust.json` of every party's public keys; with `--tls`, also `tls/ca.crt` and the
party's certificate and TLS key (`tls/<party>.crt`, `tls/<party>.key`) for mutual TLS beneath the seal.
The CA's private key is used once to sign and never written. Hand each party its own directory only.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import ipaddress
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from fedjax_llm.secure.keys import (TRUST_FILE, Identity, IdentityError, PublicIdentity, check_name,
                                    generate_identities, load_identities, load_trust, trust_of, write_trust)

TLS_DIR = "tls"


@dataclasses.dataclass(frozen=True)
class PartyKeys:
    """What a deployed process holds: its own identity, the peers it trusts, and its TLS files."""

    name: str
    directory: Path
    identity: Identity
    trust: dict[str, PublicIdentity]
    tls: Optional[tuple[bytes, bytes, bytes]] = None  # (ca, cert, key) PEM when transport.tls.enabled


def party_dir(keys_dir: str, party: str) -> Path:
    """DIR/<party> (as `init` writes it), or DIR itself when it is already that party's directory."""
    root = Path(os.path.expanduser(keys_dir))
    if (root / f"{party}.sign.pem").exists():
        return root
    return root / party


def load_party(keys_dir: Optional[str], party: str, peers: Sequence[str], tls=None) -> PartyKeys:
    """The party's own keys and its trust list, refusing another party's private key in its directory
    or a trust list that lacks a peer (IdentityError naming the file)."""
    check_name(party)
    if not keys_dir:
        raise IdentityError("deploy.keys_dir: not set; a deployed party needs its key directory "
                            "(create them with fedjax-llm-keys init --parties ... --out DIR)")
    d = party_dir(keys_dir, party)
    if not d.is_dir():
        raise IdentityError(f"deploy.keys_dir: {d}: no key directory for party {party!r} (create one with "
                            f"fedjax-llm-keys init --parties {','.join([*peers, party])} --out {keys_dir})")
    for path in sorted(d.rglob("*")):
        owner = _private_key_owner(path)
        if owner is not None and owner != party:
            raise IdentityError(f"deploy.keys_dir: {path}: private key of another party ({owner!r}) in "
                                f"{party!r}'s key directory; each party holds only its own private keys")
    identity = load_identities(d, [party])[party]
    trust_path = d / TRUST_FILE
    trust = load_trust(trust_path)
    missing = [p for p in [party, *peers] if p not in trust]
    if missing:
        raise IdentityError(f"deploy.keys_dir: {trust_path}: the trust list lacks {missing} (it lists "
                            f"{sorted(trust)}); give every party the same trust.json from fedjax-llm-keys init")
    if trust[party] != identity.public:
        raise IdentityError(f"deploy.keys_dir: {trust_path}: {party!r}'s public keys there do not match its "
                            f"private keys in {d}")
    return PartyKeys(party, d, identity, trust, _load_tls(d, party, tls) if tls is not None and tls.enabled else None)


def _private_key_owner(path: Path) -> Optional[str]:
    """The party whose private key `path` is (by name), None for anything else."""
    name = path.name
    for suffix in (".sign.pem", ".kex.pem"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    if path.parent.name == TLS_DIR and name.endswith(".key"):
        return name[: -len(".key")]
    return None


def _load_tls(d: Path, party: str, tls) -> tuple[bytes, bytes, bytes]:
    files = {"ca": tls.ca or d / TLS_DIR / "ca.crt", "cert": tls.cert or d / TLS_DIR / f"{party}.crt",
             "key": tls.key or d / TLS_DIR / f"{party}.key"}
    out = []
    for key, path in files.items():
        try:
            out.append(Path(path).read_bytes())
        except OSError as e:
            raise IdentityError(f"transport.tls.{key}: {path}: cannot read ({e.strerror or e}); create the "
                                f"TLS files with fedjax-llm-keys init --tls") from None
    return tuple(out)


def init_keys(parties: Sequence[str], out: str, tls: bool = False, hosts: Sequence[str] = ("localhost", "127.0.0.1"),
              overwrite: bool = False) -> dict[str, Path]:
    """Writes one directory per party (its private keys, 0600, and the shared trust list)."""
    parties = [check_name(p) for p in parties]
    if len(set(parties)) != len(parties) or len(parties) < 2:
        raise IdentityError(f"--parties: need at least two distinct names, got {list(parties)}")
    root = Path(out)
    existing = [root / p for p in parties if (root / p / f"{p}.sign.pem").exists()]
    if existing and not overwrite:
        raise IdentityError(f"--out: {existing[0]} already holds keys; refusing to overwrite them (--force)")
    ids = {}
    for p in parties:
        (root / p).mkdir(parents=True, exist_ok=True, mode=0o700)
        ids.update(generate_identities([p], root / p, overwrite=overwrite))
    trust = trust_of(ids)
    for p in parties:
        write_trust(root / p / TRUST_FILE, trust)
    if tls:
        _write_tls(root, parties, hosts)
    return {p: root / p for p in parties}


def _write_tls(root: Path, parties: Sequence[str], hosts: Sequence[str]) -> None:
    """A throw-away CA signs one certificate per party (CN = party name, SANs = `hosts`)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedjax_llm deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    sans = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    for p in parties:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, p)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False).sign(ca_key, hashes.SHA256()))
        d = root / p / TLS_DIR
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        (d / "ca.crt").write_bytes(ca_pem)
        (d / f"{p}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fd = os.open(d / f"{p}.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def main(argv: Optional[list[str]] = None) -> None:
    """Console script fedjax-llm-keys: one line per user error, exit 2."""
    from fedjax_llm.cli import pop_verbose, run_main

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = pop_verbose(argv)
    parser = argparse.ArgumentParser(prog="fedjax-llm-keys", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="write one key directory per party and the shared trust list")
    init.add_argument("--parties", required=True, help="comma-separated party names, e.g. east,central,west,aggregator")
    init.add_argument("--out", required=True, help="directory that receives one sub-directory per party")
    init.add_argument("--tls", action="store_true", help="also a CA and one certificate per party (mutual TLS)")
    init.add_argument("--hosts", default="localhost,127.0.0.1", help="names and addresses the certificates cover")
    init.add_argument("--force", action="store_true", help="overwrite existing keys")
    args = parser.parse_args(argv)

    def run() -> int:
        dirs = init_keys([p.strip() for p in args.parties.split(",") if p.strip()], args.out, args.tls,
                         [h.strip() for h in args.hosts.split(",") if h.strip()], args.force)
        for p, d in dirs.items():
            print(f"{p}: {d}")
        return 0

    sys.exit(run_main(run, "fedjax-llm-keys", verbose))


if __name__ == "__main__":
    main()
