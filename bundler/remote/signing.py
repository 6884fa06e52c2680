"""Signatures over JSON documents (refs, per-kernel autotune records): HMAC-SHA256 or Ed25519.

Whoever can write to the bucket can run code on every node that pulls from it (DESIGN.md, threat
model), so a reader that has any key configured trusts only documents signed by a key it holds.

What a signature covers, and why each part:

* the document *kind* (``"ref"``, ``"autotune-record"``), so a signature made for one kind of
  object cannot be presented as another;
* the object's *name* (ref name, record key), so a signed document copied under another name fails;
* the *body*: for a ref that is the bundle digest (which pins the manifest, which pins every byte),
  its size, the producer facts and a monotonic ``version``; for a record, the whole record;
* the *scheme* and *key id*, so a signature cannot be re-read under another algorithm or key.

All of it is signed in one canonical JSON form (sorted keys, no whitespace), so a signature does
not depend on how a writer laid the document out.

Two schemes, chosen by what is configured (:class:`bundler.config.Settings`):

* ``hmac-sha256``, a shared secret (``BUNDLER_SIGNING_KEY``). Every reader can also sign, so it
  suits clusters where readers and writers are equally trusted.
* ``ed25519``, a key pair (``BUNDLER_SIGNING_KEY_FILE`` holds the writer's private key,
  ``BUNDLER_TRUSTED_KEYS`` the public keys readers accept): a node that is broken into cannot
  sign anything. Uses the ``cryptography`` package, imported only when such a key is configured,
  so ``import bundler`` stays cheap.

A signature is one string, ``<scheme>:<key id>:<base64 value>``. The key id (16 hex digits of a
hash of the key) lets a reader holding several keys pick the right one, which is what makes key
rotation cheap: trust the new key next to the old one, move writers to the new key, then drop the
old one. ``docs/signing.md`` walks through setup, rotation and what replay protection covers.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bundler.config import Settings
from bundler.errors import ConfigError

HMAC = "hmac-sha256"
ED25519 = "ed25519"
#: The inline form of an Ed25519 public key in ``BUNDLER_TRUSTED_KEYS``: ``ed25519:<base64>``.
PUBLIC_KEY_PREFIX = ED25519 + ":"
_FORMAT = "kernel-bundler/signature-v2"


def _canonical(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, sort_keys=True, separators=(",", ":")).encode()


def _message(kind: str, name: str, body: Mapping[str, Any], scheme: str, key_id: str) -> bytes:
    """The bytes a signature is made over: everything listed in the module docstring."""
    return _canonical(
        {"format": _FORMAT, "kind": kind, "name": name, "scheme": scheme, "key_id": key_id, "body": body}
    )


def _key_id(material: bytes) -> str:
    return hashlib.sha256(b"kernel-bundler key id\0" + material).hexdigest()[:16]


class _HmacKey:
    scheme = HMAC

    def __init__(self, secret: str) -> None:
        self._secret = secret.encode()
        self.key_id = _key_id(b"hmac\0" + self._secret)
        self.can_sign = True

    def sign(self, message: bytes) -> bytes:
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def verify(self, message: bytes, value: bytes) -> bool:
        return hmac.compare_digest(value, self.sign(message))


class _Ed25519Key:
    scheme = ED25519

    def __init__(self, public: Any, private: Any = None) -> None:
        from cryptography.hazmat.primitives import serialization

        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._public = public
        self._private = private
        self.key_id = _key_id(b"ed25519\0" + raw)
        self.can_sign = private is not None
        self.inline = PUBLIC_KEY_PREFIX + base64.b64encode(raw).decode()

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def verify(self, message: bytes, value: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self._public.verify(value, message)
        except InvalidSignature:
            return False
        return True


class Keyring:
    """The keys one process signs with (at most one) and accepts (any number).

    Built from settings with :func:`keyring`. ``enabled`` means a key of some kind is configured,
    and then every document read must carry a signature from one of ``accepted`` keys.
    """

    def __init__(self, signer: Any | None, accepted: list[Any]) -> None:
        self.signer = signer
        self.accepted = {key.key_id: key for key in accepted}

    @property
    def enabled(self) -> bool:
        return bool(self.accepted)

    @property
    def can_sign(self) -> bool:
        return self.signer is not None

    def require_signer(self) -> Any:
        """The signing key; ConfigError when this process holds only public keys, because a
        reader must not write documents that every other reader would then refuse."""
        if self.signer is None:
            raise ConfigError(
                "no signing key: BUNDLER_TRUSTED_KEYS holds only public keys, which verify but cannot sign; "
                "set BUNDLER_SIGNING_KEY_FILE (Ed25519 private key) or BUNDLER_SIGNING_KEY on writers"
            )
        return self.signer

    def sign(self, kind: str, name: str, body: Mapping[str, Any]) -> str:
        """The signature string for ``body`` as object ``name`` of ``kind`` (see :meth:`require_signer`)."""
        key = self.require_signer()
        value = key.sign(_message(kind, name, body, key.scheme, key.key_id))
        return f"{key.scheme}:{key.key_id}:{base64.b64encode(value).decode()}"

    def problem(self, kind: str, name: str, body: Mapping[str, Any], signature: object) -> str | None:
        """Why ``signature`` does not vouch for ``body`` (a phrase to put after the object's name),
        or None when it does. Always None when no key is configured."""
        if not self.enabled:
            return None
        if signature is None or signature == "":
            return "is unsigned"
        parts = signature.split(":") if isinstance(signature, str) else []
        if len(parts) != 3 or parts[0] not in (HMAC, ED25519):
            return ("has a wrong signature: it is not in the current format (scheme:key id:value; refs and "
                    "records signed before signature format 2 bind no version)")
        scheme, key_id, encoded = parts
        key = self.accepted.get(key_id)
        if key is None or key.scheme != scheme:
            return (f"has a wrong signature: it names {scheme} key {key_id}, which is not one of the keys "
                    f"trusted here ({', '.join(sorted(self.accepted))}); add that key to BUNDLER_TRUSTED_KEYS "
                    "or BUNDLER_SIGNING_KEY if it is yours, else the object was forged")
        try:
            value = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return "has a wrong signature: its value is not base64"
        try:
            message = _message(kind, name, body, scheme, key_id)
        except (RecursionError, ValueError, TypeError) as exc:  # a body built to break the encoder
            return f"cannot be checked: its content cannot be encoded for the check ({type(exc).__name__})"
        if not key.verify(message, value):
            return f"has a wrong signature: it was tampered with, or signed with another key than {key_id}"
        return None

    def verify(self, kind: str, name: str, body: Mapping[str, Any], signature: object) -> bool:
        """True when ``signature`` vouches for ``body`` (or no key is configured)."""
        return self.problem(kind, name, body, signature) is None


def keyring(settings: Settings) -> Keyring:
    """The keyring ``settings`` describe. Raises ConfigError naming the variable that is wrong.

    Cached per distinct key settings: autotune looks records up once per kernel, and parsing PEM
    files that often would cost more than the lookup. A changed key file is read by new processes.
    """
    return _keyring(settings.signing_key, settings.signing_key_file, tuple(settings.trusted_keys))


@functools.lru_cache(maxsize=16)
def _keyring(secrets: str | None, key_file: Path | None, trusted: tuple[str, ...]) -> Keyring:
    accepted: list[Any] = []
    signer = None
    if key_file is not None:
        signer = _load_private(key_file)
        accepted.append(signer)
    if secrets is not None:
        hmac_keys = [_HmacKey(s.strip()) for s in secrets.split(",")]
        signer = signer or hmac_keys[0]
        accepted.extend(hmac_keys)
    accepted.extend(_load_public(entry) for entry in trusted)
    return Keyring(signer, accepted)


def _crypto(variable: str) -> Any:
    """The ``cryptography`` serialization module, or a ConfigError saying how to install it."""
    try:
        from cryptography.hazmat.primitives import serialization
    except ImportError:
        raise ConfigError(
            f"{variable} is set, and Ed25519 keys need the 'cryptography' package: pip install 'cryptography>=42'"
        ) from None
    return serialization


def _load_private(path: Path) -> _Ed25519Key:
    serialization = _crypto("BUNDLER_SIGNING_KEY_FILE")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"BUNDLER_SIGNING_KEY_FILE={path}: cannot read it ({exc}); make it readable by this "
                          "user or generate a key pair with bundler.remote.signing.generate_ed25519") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"BUNDLER_SIGNING_KEY_FILE={path} is not an unencrypted PEM private key ({exc}); "
                          "generate one with bundler.remote.signing.generate_ed25519") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"BUNDLER_SIGNING_KEY_FILE={path} holds a {type(private).__name__}, not an Ed25519 key")
    return _Ed25519Key(private.public_key(), private)


def _load_public(entry: str) -> _Ed25519Key:
    """One ``BUNDLER_TRUSTED_KEYS`` entry: ``ed25519:<base64>``, or a file holding a PEM public key,
    an OpenSSH ``ssh-ed25519`` line or the inline form."""
    serialization = _crypto("BUNDLER_TRUSTED_KEYS")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    where = f"BUNDLER_TRUSTED_KEYS entry {entry!r}"
    text = entry
    if not entry.startswith(PUBLIC_KEY_PREFIX):
        try:
            text = Path(entry).expanduser().read_text(encoding="ascii", errors="replace").strip()
        except OSError as exc:
            raise ConfigError(f"{where} is neither 'ed25519:<base64>' nor a readable key file ({exc})") from None
    try:
        if text.startswith(PUBLIC_KEY_PREFIX):
            raw = base64.b64decode(text[len(PUBLIC_KEY_PREFIX):], validate=True)
            public = Ed25519PublicKey.from_public_bytes(raw)
        elif text.startswith("ssh-ed25519 "):
            public = serialization.load_ssh_public_key(text.encode())
        else:
            public = serialization.load_pem_public_key(text.encode())
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ConfigError(f"{where} is not an Ed25519 public key ({exc}); use the .pub file "
                          "generate_ed25519 wrote, or its 'ed25519:...' line") from None
    if not isinstance(public, Ed25519PublicKey):
        raise ConfigError(f"{where} holds a {type(public).__name__}, not an Ed25519 public key")
    return _Ed25519Key(public)


def generate_ed25519(path: str | os.PathLike[str]) -> str:
    """Write a new Ed25519 key pair: the private key (PEM, mode 0600) at ``path``, the public key
    (PEM) at ``<path>.pub``. Returns the public key's inline form, ``ed25519:<base64>``.

    Writers point ``BUNDLER_SIGNING_KEY_FILE`` at ``path``; readers list the ``.pub`` file or the
    returned line in ``BUNDLER_TRUSTED_KEYS``. Refuses to overwrite either file (FileExistsError),
    since replacing a key in use would make every reader refuse what the old one signed.
    """
    serialization = _crypto("generate_ed25519")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    target = Path(path)
    pub = target.with_name(target.name + ".pub")
    if pub.exists():
        raise FileExistsError(f"{pub} exists; move it away or choose another path for the new key")
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    fd = os.open(pub, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(public_pem)
    return _Ed25519Key(private.public_key()).inline
