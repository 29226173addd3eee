"""Long-term identities: an Ed25519 signing key and an X25519 key-agreement key per party.

Private keys live in `<dir>/<party>.sign.pem` and `<dir>/<party>.kex.pem` (PKCS#8 PEM, mode 0600,
optionally passphrase-encrypted); `<dir>/trust.json` lists every party's public keys as hex, so a peer
can be given the trust file alone. Key material is never logged or put in a repr.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Mapping, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from fedjax_llm.errors import UserError

TRUST_FILE = "trust.json"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)


class IdentityError(UserError, ValueError):
    """A key or trust file that is missing, unreadable, too open, or inconsistent; names file and party."""


@dataclasses.dataclass(frozen=True)
class PublicIdentity:
    """What peers know about a party: its name, signature-verification key and key-agreement key."""

    name: str
    verify_key: Ed25519PublicKey = dataclasses.field(repr=False, compare=False)
    agreement_key: X25519PublicKey = dataclasses.field(repr=False, compare=False)

    def to_json(self) -> dict[str, str]:
        return {"sign": self.verify_key.public_bytes(**_RAW).hex(),
                "kex": self.agreement_key.public_bytes(**_RAW).hex()}

    def __eq__(self, other) -> bool:
        return isinstance(other, PublicIdentity) and (self.name, self.to_json()) == (other.name, other.to_json())

    def __hash__(self) -> int:
        return hash((self.name, tuple(self.to_json().values())))


@dataclasses.dataclass(frozen=True)
class Identity:
    """A party's private keys; `public` is what goes into the trust file."""

    name: str
    signing_key: Ed25519PrivateKey = dataclasses.field(repr=False, compare=False)
    agreement_key: X25519PrivateKey = dataclasses.field(repr=False, compare=False)

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(self.name, self.signing_key.public_key(), self.agreement_key.public_key())


Trust = Mapping[str, PublicIdentity]


def check_name(name: str) -> str:
    """Party names become file names and header fields: letters, digits, '_', '.', '-'; 64 at most."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise IdentityError(f"secure.keys: party name {name!r} must match {_NAME.pattern}")
    return name


def new_identity(name: str) -> Identity:
    """Fresh keys from the OS random source, in memory only."""
    return Identity(check_name(name), Ed25519PrivateKey.generate(), X25519PrivateKey.generate())


def trust_of(identities: Iterable[Identity] | Mapping[str, Identity]) -> dict[str, PublicIdentity]:
    """The public half of a set of identities, keyed by party."""
    values = identities.values() if isinstance(identities, Mapping) else identities
    return {i.name: i.public for i in values}


def _write_private(path: Path, data: bytes, overwrite: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise IdentityError(f"secure.keys: {path} already exists; refusing to overwrite a private key "
                            f"(pass overwrite=True, or load_identities to reuse it)") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # O_CREAT's mode is masked by umask; overwrite keeps old modes
        f.write(data)


def _pem(key, password: Optional[bytes]) -> bytes:
    enc = (serialization.BestAvailableEncryption(password) if password
           else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def _key_paths(directory: Path, name: str) -> tuple[Path, Path]:
    return directory / f"{name}.sign.pem", directory / f"{name}.kex.pem"


def write_trust(path: str | os.PathLike, trust: Trust) -> None:
    """Writes a trust file: {"version": 1, "parties": {name: {"sign": hex, "kex": hex}}}."""
    doc = {"version": 1, "parties": {n: p.to_json() for n, p in sorted(trust.items())}}
    Path(path).write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")


def generate_identities(names: Iterable[str], directory: str | os.PathLike | None = None, *,
                        password: Optional[bytes] = None, overwrite: bool = False) -> dict[str, Identity]:
    """Fresh identities for `names`; with a directory, writes key files (0600) and trust.json."""
    names = [check_name(n) for n in names]
    if len(set(names)) != len(names):
        raise IdentityError(f"secure.keys: duplicate party names in {names}")
    ids = {n: new_identity(n) for n in names}
    if directory is None:
        return ids
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    existing = [p for n in names for p in _key_paths(d, n) if p.exists()]
    if existing and not overwrite:  # checked up front: a refused call writes nothing
        raise IdentityError(f"secure.keys: {existing[0]} already exists; refusing to overwrite a private "
                            f"key (pass overwrite=True, or load_identities to reuse it)")
    for n, ident in ids.items():
        sign_path, kex_path = _key_paths(d, n)
        _write_private(sign_path, _pem(ident.signing_key, password), overwrite)
        _write_private(kex_path, _pem(ident.agreement_key, password), overwrite)
    trust = load_trust(d / TRUST_FILE) if (d / TRUST_FILE).exists() else {}
    write_trust(d / TRUST_FILE, {**trust, **trust_of(ids)})  # other parties' entries are kept
    return ids


def _read_private(path: Path, name: str, kind: type, password: Optional[bytes]):
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise IdentityError(f"secure.keys: party {name!r}: key file {path} not found") from None
    if mode & 0o077:
        raise IdentityError(f"secure.keys: party {name!r}: key file {path} has mode {mode:04o}; "
                            f"private keys must not be readable by others (chmod 600 {path})")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=password)
    except (ValueError, TypeError) as e:
        raise IdentityError(f"secure.keys: party {name!r}: cannot read {path}: {e}") from None
    if not isinstance(key, kind):
        raise IdentityError(f"secure.keys: party {name!r}: {path} holds a {type(key).__name__}, "
                            f"expected {kind.__name__}")
    return key


def load_identities(directory: str | os.PathLike, names: Iterable[str], *,
                    password: Optional[bytes] = None) -> dict[str, Identity]:
    """Reloads identities written by generate_identities; checks them against trust.json if present."""
    d = Path(directory)
    out = {}
    for n in names:
        sign_path, kex_path = _key_paths(d, check_name(n))
        out[n] = Identity(n, _read_private(sign_path, n, Ed25519PrivateKey, password),
                          _read_private(kex_path, n, X25519PrivateKey, password))
    if (d / TRUST_FILE).exists():
        trust = load_trust(d / TRUST_FILE)
        for n, ident in out.items():
            if n in trust and trust[n] != ident.public:
                raise IdentityError(f"secure.keys: party {n!r}: private keys in {d} do not match the "
                                    f"public keys listed in {d / TRUST_FILE}")
    return out


def _public_key(hexstr, kind, path, name, field):
    try:
        return kind.from_public_bytes(bytes.fromhex(hexstr))
    except (ValueError, TypeError) as e:
        raise IdentityError(f"secure.keys: {path}: party {name!r}: field {field!r} is not a 32-byte "
                            f"hex public key ({e})") from None


def load_trust(path: str | os.PathLike) -> dict[str, PublicIdentity]:
    """Reads a trust list of peers' public keys: name -> PublicIdentity."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        parties = doc["parties"]
    except FileNotFoundError:
        raise IdentityError(f"secure.keys: trust file {path} not found") from None
    except (ValueError, KeyError, TypeError) as e:
        raise IdentityError(f"secure.keys: trust file {path} unreadable: {type(e).__name__}: {e}") from None
    if doc.get("version") != 1:
        raise IdentityError(f"secure.keys: trust file {path}: version {doc.get('version')!r}, expected 1")
    out = {}
    for name, keys in parties.items():
        check_name(name)
        if not isinstance(keys, dict) or set(keys) != {"sign", "kex"}:
            raise IdentityError(f"secure.keys: {path}: party {name!r} must have exactly 'sign' and 'kex'")
        out[name] = PublicIdentity(name, _public_key(keys["sign"], Ed25519PublicKey, path, name, "sign"),
                                   _public_key(keys["kex"], X25519PublicKey, path, name, "kex"))
    return out
