"""Signed refs and records: HMAC and Ed25519, rotation, replay, empty keys, hostile record values.

Ref tests run over every store backend (``store`` is local, moto in-process and moto over HTTP).
Each attack test writes what an attacker with bucket write access (but no key) could write, and
asserts the reader refuses it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
import triton

from bundler.autotune import AutotuneCache, configs_hash
from bundler.config import Settings
from bundler.errors import BundleError, ConfigError, SignatureError
from bundler.remote import health, layout, refs, signing, transfer
from bundler.stores import open_store

DIGEST_A = "a" * 64
DIGEST_B = "b" * 64


@pytest.fixture
def base(small_settings: Settings, tmp_path: Path) -> Settings:
    """Transfer settings with a private cache folder (readers remember ref versions there)."""
    return small_settings.replace(cache_dir=tmp_path / "node")


@pytest.fixture(scope="module")
def ed_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("keys")
    old_inline = signing.generate_ed25519(folder / "old.pem")
    new_inline = signing.generate_ed25519(folder / "new.pem")
    return {"old": folder / "old.pem", "old_pub": folder / "old.pem.pub", "old_inline": old_inline,
            "new": folder / "new.pem", "new_pub": folder / "new.pem.pub", "new_inline": new_inline}


def _doc(store, name: str) -> dict:  # noqa: ANN001
    return json.loads(store.read_bytes(layout.ref_key(name)))


def _put(store, name: str, doc: dict) -> None:  # noqa: ANN001
    store.write_bytes(layout.ref_key(name), json.dumps(doc).encode())


# --- round trips over real stores ------------------------------------------------------------------


def test_hmac_round_trip_through_push_and_pull(store, base, tmp_path: Path) -> None:  # noqa: ANN001
    src = tmp_path / "src"
    src.mkdir()
    (src / "kernel.cubin").write_bytes(b"\x7fELF" + b"x" * 500)
    writer = base.replace(signing_key="s3cret")
    pushed = transfer.push(store, src, ref="prod", settings=writer)
    ref = refs.read_ref(store, "prod", writer.replace(cache_dir=tmp_path / "reader"))
    assert ref.signature.startswith("hmac-sha256:") and ref.version > 0
    assert ref.digest == pushed.digest
    transfer.pull(store, tmp_path / "out", ref="prod", settings=writer.replace(cache_dir=tmp_path / "r2"))
    assert (tmp_path / "out" / "kernel.cubin").read_bytes() == (src / "kernel.cubin").read_bytes()


def test_ed25519_writer_signs_and_a_reader_with_only_the_public_key_verifies(store, base, ed_keys) -> None:  # noqa: ANN001
    writer = base.replace(signing_key_file=ed_keys["old"])
    refs.write_ref(store, "prod", DIGEST_A, 10, settings=writer)
    assert _doc(store, "prod")["signature"].startswith("ed25519:")
    for trusted in (str(ed_keys["old_pub"]), ed_keys["old_inline"]):  # a .pub file or the inline form
        reader = base.replace(trusted_keys=(trusted,), cache_dir=base.cache_dir / trusted[-8:])
        assert refs.read_ref(store, "prod", reader).digest == DIGEST_A
    assert signing.keyring(base.replace(trusted_keys=(ed_keys["old_inline"],))).can_sign is False


def test_a_reader_that_trusts_another_public_key_refuses(store, base, ed_keys) -> None:  # noqa: ANN001
    refs.write_ref(store, "prod", DIGEST_A, 10, settings=base.replace(signing_key_file=ed_keys["old"]))
    with pytest.raises(SignatureError, match="not one of the keys trusted here"):
        refs.read_ref(store, "prod", base.replace(trusted_keys=(ed_keys["new_inline"],)))


def test_a_reader_with_only_public_keys_cannot_write_a_ref(store, base, ed_keys) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="BUNDLER_SIGNING_KEY_FILE"):
        refs.write_ref(store, "prod", DIGEST_A, 10, settings=base.replace(trusted_keys=(ed_keys["new_inline"],)))
    assert list(store.list("")) == []


# --- tampering ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["hmac", "ed25519"])
@pytest.mark.parametrize("change", ["digest", "name", "version", "size", "signature-scheme"])
def test_tampered_ref_is_refused(store, base, ed_keys, scheme: str, change: str) -> None:  # noqa: ANN001
    settings = base.replace(signing_key="s3cret") if scheme == "hmac" else base.replace(signing_key_file=ed_keys["old"])
    refs.write_ref(store, "prod", DIGEST_A, 10, settings=settings)
    doc = _doc(store, "prod")
    name = "prod"
    if change == "digest":
        doc["digest"] = DIGEST_B
    elif change == "name":  # a signed ref for "prod", moved to "other" with its name rewritten
        doc["name"] = name = "other"
    elif change == "version":  # pushed ahead so it outranks every later honest ref
        doc["version"] += 10**15
    elif change == "size":
        doc["size"] = 11
    else:  # the same bytes claimed under the other scheme
        other = "ed25519" if scheme == "hmac" else "hmac-sha256"
        doc["signature"] = other + doc["signature"][doc["signature"].index(":"):]
    _put(store, name, doc)
    with pytest.raises(SignatureError, match="wrong signature"):
        refs.read_ref(store, name, settings)


def test_signature_binds_the_document_kind() -> None:
    keys = signing.keyring(Settings(signing_key="s3cret"))
    body = {"digest": DIGEST_A, "version": 1}
    signature = keys.sign("autotune-record", "prod", body)
    assert keys.verify("autotune-record", "prod", body, signature)
    assert not keys.verify("ref", "prod", body, signature)
    assert not keys.verify("autotune-record", "other", body, signature)


@pytest.mark.parametrize("reader", ["hmac", "ed25519-public"])
def test_unsigned_ref_is_refused_when_a_key_is_set(store, base, ed_keys, reader: str) -> None:  # noqa: ANN001
    refs.write_ref(store, "prod", DIGEST_A, 10, settings=base)
    assert "signature" not in _doc(store, "prod")
    settings = base.replace(signing_key="s3cret") if reader == "hmac" else base.replace(
        trusted_keys=(ed_keys["old_inline"],))
    with pytest.raises(SignatureError, match="unsigned"):
        refs.read_ref(store, "prod", settings)


def test_ref_signed_in_the_old_format_is_refused(store, base) -> None:  # noqa: ANN001
    """Format-1 signatures (``hmac-sha256:<hex>``) bind no version, so they could be replayed forever."""
    refs.write_ref(store, "prod", DIGEST_A, 10, settings=base)
    doc = _doc(store, "prod")
    doc["signature"] = "hmac-sha256:" + "0" * 64
    _put(store, "prod", doc)
    with pytest.raises(SignatureError, match="not in the current format"):
        refs.read_ref(store, "prod", base.replace(signing_key="s3cret"))


# --- rotation -------------------------------------------------------------------------------------------


def test_hmac_rotation_first_secret_signs_all_verify(store, base) -> None:  # noqa: ANN001
    refs.write_ref(store, "old", DIGEST_A, 10, settings=base.replace(signing_key="old-secret"))
    rotating = base.replace(signing_key="new-secret,old-secret")
    assert refs.read_ref(store, "old", rotating).digest == DIGEST_A  # old key still verifies
    refs.write_ref(store, "new", DIGEST_B, 10, settings=rotating)
    assert refs.read_ref(store, "new", base.replace(signing_key="new-secret")).digest == DIGEST_B  # new key signs
    with pytest.raises(SignatureError):
        refs.read_ref(store, "new", base.replace(signing_key="old-secret", cache_dir=base.cache_dir / "o"))


def test_ed25519_rotation_readers_trust_both_keys(store, base, ed_keys) -> None:  # noqa: ANN001
    refs.write_ref(store, "a", DIGEST_A, 10, settings=base.replace(signing_key_file=ed_keys["old"]))
    refs.write_ref(store, "b", DIGEST_B, 10, settings=base.replace(signing_key_file=ed_keys["new"]))
    reader = base.replace(trusted_keys=(ed_keys["old_inline"], str(ed_keys["new_pub"])))
    assert refs.read_ref(store, "a", reader).digest == DIGEST_A
    assert refs.read_ref(store, "b", reader).digest == DIGEST_B
    assert len(signing.keyring(reader).accepted) == 2


def test_signature_names_its_key_id(base, ed_keys) -> None:  # noqa: ANN001
    old = signing.keyring(base.replace(signing_key_file=ed_keys["old"]))
    new = signing.keyring(base.replace(signing_key_file=ed_keys["new"]))
    a = old.sign("ref", "x", {}).split(":")[1]
    b = new.sign("ref", "x", {}).split(":")[1]
    assert a != b and a in old.accepted and b in new.accepted


# --- replay --------------------------------------------------------------------------------------------


def test_older_signed_ref_is_refused_after_a_newer_one_was_seen(store, base, monkeypatch) -> None:  # noqa: ANN001
    writer = base.replace(signing_key="s3cret", cache_dir=base.cache_dir / "writer")
    reader = base.replace(signing_key="s3cret")
    # The old ref was written an hour ago: far outside the slack two concurrent pushes get.
    hour_ago = time.time_ns() - 3600 * 10**9
    with monkeypatch.context() as patch:
        patch.setattr(refs, "_last_version", 0)
        patch.setattr(refs.time, "time_ns", lambda: hour_ago)
        refs.write_ref(store, "prod", DIGEST_A, 10, settings=writer)
    old_bytes = store.read_bytes(layout.ref_key("prod"))
    assert refs.read_ref(store, "prod", reader).digest == DIGEST_A
    refs.write_ref(store, "prod", DIGEST_B, 10, settings=writer)
    assert refs.read_ref(store, "prod", reader).digest == DIGEST_B
    store.write_bytes(layout.ref_key("prod"), old_bytes)  # the attacker puts the old, validly signed ref back
    with pytest.raises(SignatureError, match="older than version .* already accepted") as info:
        refs.read_ref(store, "prod", reader)
    assert "push the old bundle to the ref again" in str(info.value)
    # The documented limit: a node that never saw the newer ref cannot tell.
    assert refs.read_ref(store, "prod", reader.replace(cache_dir=base.cache_dir / "fresh")).digest == DIGEST_A


class _SlowWrites:
    """A producer whose ref PUT is slow (a retried request, a slow link): it lands on cue."""

    def __init__(self, inner, landed: threading.Event) -> None:  # noqa: ANN001
        self._inner, self._landed = inner, landed
        self.floor_read = threading.Event()

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._inner, name)

    def read_bytes(self, key: str, **kwargs) -> bytes:  # noqa: ANN003
        try:
            return self._inner.read_bytes(key, **kwargs)
        finally:
            self.floor_read.set()

    def write_bytes(self, key: str, data: bytes, **kwargs) -> None:  # noqa: ANN003
        assert self._landed.wait(10)
        self._inner.write_bytes(key, data, **kwargs)


def test_two_producers_racing_on_one_ref_leave_a_ref_every_node_accepts(store, base) -> None:  # noqa: ANN001
    """Job A picks its version first but its PUT lands after job B's: the stored ref is A's, with a
    lower version than B's, which some nodes read in between. Those nodes must accept A's ref, not
    refuse it as a replay (and run cold while fresh nodes accept it)."""
    writer = base.replace(signing_key="s3cret", cache_dir=base.cache_dir / "writer")
    node = base.replace(signing_key="s3cret")
    release = threading.Event()
    a_store = _SlowWrites(store, release)
    slow = threading.Thread(target=refs.write_ref, args=(a_store, "prod", DIGEST_A, 10), kwargs={"settings": writer})
    slow.start()
    assert a_store.floor_read.wait(10)  # A has read the stored version...
    time.sleep(0.05)  # ...and chosen its own (no store call in between to wait on)
    b = refs.write_ref(store, "prod", DIGEST_B, 10, settings=writer)
    assert refs.read_ref(store, "prod", node).digest == DIGEST_B
    release.set()
    slow.join(10)
    final = refs.read_ref(store, "prod", node)
    assert final.digest == DIGEST_A and final.version < b.version
    # ...and the node still remembers B's version, so a genuinely old ref stays refused.
    assert refs._read_seen(refs.seen_path(store, "prod", node)) == b.version


def test_rollback_by_pushing_again_is_accepted(store, base) -> None:  # noqa: ANN001
    writer = base.replace(signing_key="s3cret", cache_dir=base.cache_dir / "writer")
    reader = base.replace(signing_key="s3cret")
    refs.write_ref(store, "prod", DIGEST_A, 10, settings=writer)
    refs.write_ref(store, "prod", DIGEST_B, 10, settings=writer)
    assert refs.read_ref(store, "prod", reader).digest == DIGEST_B
    refs.write_ref(store, "prod", DIGEST_A, 10, settings=writer)
    assert refs.read_ref(store, "prod", reader).digest == DIGEST_A


def test_a_writer_with_a_slow_clock_still_moves_the_version_forward(store, base, monkeypatch) -> None:  # noqa: ANN001
    writer = base.replace(signing_key="s3cret")
    first = refs.write_ref(store, "prod", DIGEST_A, 10, settings=writer)
    monkeypatch.setattr(refs, "_last_version", 0)  # another process...
    monkeypatch.setattr(refs.time, "time_ns", lambda: first.version - 10**12)  # ...whose clock is behind
    second = refs.write_ref(store, "prod", DIGEST_B, 10, settings=writer)
    assert second.version > first.version


def test_max_age_refuses_an_old_signed_ref(store, base) -> None:  # noqa: ANN001
    settings = base.replace(signing_key="s3cret")
    old = refs.Ref(name="prod", digest=DIGEST_A, size=10, created="2020-01-01T00:00:00+00:00",
                   version=time.time_ns() - 7200 * 10**9)
    doc = {**old.body(), "signature": signing.keyring(settings).sign(refs.KIND, "prod", old.body())}
    _put(store, "prod", doc)
    assert refs.read_ref(store, "prod", settings).digest == DIGEST_A  # no age limit by default
    with pytest.raises(SignatureError, match="BUNDLER_REF_MAX_AGE"):
        refs.read_ref(store, "prod", settings.replace(ref_max_age=3600.0))


def test_forged_huge_version_does_not_poison_the_writer(store, base) -> None:  # noqa: ANN001
    writer = base.replace(signing_key="s3cret")
    refs.write_ref(store, "prod", DIGEST_A, 10, settings=writer)
    doc = _doc(store, "prod")
    doc["version"] = (1 << 63) - 1  # unsigned-valid: the attacker has no key
    _put(store, "prod", doc)
    written = refs.write_ref(store, "prod", DIGEST_B, 10, settings=writer)
    assert written.version < 1 << 62


# --- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["BUNDLER_SIGNING_KEY", "BUNDLER_SIGNING_KEY_FILE", "BUNDLER_TRUSTED_KEYS",
                                      "BUNDLER_REF_MAX_AGE"])
@pytest.mark.parametrize("value", ["", "  "])
def test_empty_signing_variable_is_a_config_error(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


@pytest.mark.parametrize("variable,value", [("BUNDLER_SIGNING_KEY", "a,,b"), ("BUNDLER_TRUSTED_KEYS", "ed25519:x,")])
def test_empty_entry_in_a_key_list_is_a_config_error(variable: str, value: str) -> None:
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


def test_empty_key_passed_directly_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="BUNDLER_SIGNING_KEY"):
        Settings(signing_key="")


def test_bad_key_files_are_config_errors_naming_the_variable(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("not a key")
    for settings, variable in (
        (Settings(signing_key_file=tmp_path / "missing.pem"), "BUNDLER_SIGNING_KEY_FILE"),
        (Settings(signing_key_file=tmp_path / "junk.pem"), "BUNDLER_SIGNING_KEY_FILE"),
        (Settings(trusted_keys=(str(tmp_path / "missing.pub"),)), "BUNDLER_TRUSTED_KEYS"),
        (Settings(trusted_keys=("ed25519:AAAA",)), "BUNDLER_TRUSTED_KEYS"),
    ):
        with pytest.raises(ConfigError, match=variable):
            signing.keyring(settings)


def test_signing_configured_follows_every_key_setting(ed_keys) -> None:  # noqa: ANN001
    assert not Settings().signing_configured
    assert Settings(signing_key="s").signing_configured
    assert Settings(signing_key_file=ed_keys["old"]).signing_configured
    assert Settings(trusted_keys=(ed_keys["old_inline"],)).signing_configured


def test_generate_refuses_to_overwrite_a_key(ed_keys) -> None:  # noqa: ANN001
    before = Path(ed_keys["old"]).read_bytes()
    with pytest.raises(FileExistsError):
        signing.generate_ed25519(ed_keys["old"])
    assert Path(ed_keys["old"]).read_bytes() == before
    assert Path(ed_keys["old"]).stat().st_mode & 0o077 == 0


# --- autotune records -------------------------------------------------------------------------------


class _CountingConfig(triton.Config):
    built = 0

    def __init__(self, *args: object, **kwargs: object) -> None:
        type(self).built += 1
        super().__init__(*args, **kwargs)


@pytest.fixture
def fresh_breakers():  # noqa: ANN201
    health.reset()
    yield
    health.reset()


def _record_cache(settings: Settings, configs: list) -> AutotuneCache:
    cache = AutotuneCache.create({"kernel": "k"}, "/src/k.py", configs_hash(configs), settings=settings)
    assert cache is not None
    return cache


def test_ed25519_signed_record_round_trip_and_public_only_node_does_not_push(
        tmp_path: Path, ed_keys, fresh_breakers) -> None:  # noqa: ANN001
    configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (16, 32)]
    remote = (tmp_path / "s").as_uri()
    writer = Settings(cache_dir=tmp_path / "ci", remote=remote, signing_key_file=ed_keys["old"])
    reader = Settings(cache_dir=tmp_path / "node", remote=remote, trusted_keys=(ed_keys["old_inline"],))
    _record_cache(writer, configs).save(configs[1], 1)
    assert _record_cache(reader, configs).read_best(configs) is configs[1]
    other = Settings(cache_dir=tmp_path / "node2", remote=(tmp_path / "s2").as_uri(),
                     trusted_keys=(ed_keys["old_inline"],))
    _record_cache(other, configs).save(configs[0], 1)
    assert list(open_store(other.remote).list("")) == []  # kept local: every reader would refuse it
    assert _record_cache(other, configs).local_path.is_file()


@pytest.mark.parametrize("change", [
    {"fields": {"num_warps": 2**31}},
    {"fields": {"num_warps": 3}},
    {"fields": {"num_stages": -1}},
    {"kwargs": {"BLOCK": "32"}},
    {"kwargs": {"BLOCK": 2**40}},
    {"kwargs": {"BLOCK": True}},
    {"kwargs": {"BLOCK": 1.5}},
    {"time_taken_ns": -5},
    {"time_taken_ns": 2**70},
], ids=["warps-2**31", "warps-3", "stages-negative", "block-str", "block-2**40", "block-bool", "block-float",
        "time-negative", "time-2**70"])
def test_absurd_unsigned_record_values_are_a_miss_with_no_config_built(
        tmp_path: Path, change: dict, fresh_breakers, caplog) -> None:  # noqa: ANN001
    configs = [_CountingConfig({"BLOCK": b}, num_warps=4) for b in (16, 32)]
    settings = Settings(cache_dir=tmp_path / "c", remote=(tmp_path / "s").as_uri(), local_cache=False,
                        bundles=False)
    cache = _record_cache(settings, configs)
    cache.save(_CountingConfig({"BLOCK": 64}, num_warps=8), 1, found_by_coordesc=True)
    store = open_store(settings.remote)
    key = layout.autotune_key(cache.key)
    record = json.loads(store.read_bytes(key))
    assert _record_cache(settings, configs).read_best(configs).kwargs == {"BLOCK": 64}  # honest: rebuilt
    for name, value in change.items():
        record[name] = {**record[name], **value} if isinstance(value, dict) else value
    store.write_bytes(key, json.dumps(record).encode())
    built = _CountingConfig.built
    with caplog.at_level(logging.DEBUG, logger="bundler.autotune"):
        assert _record_cache(settings, configs).read_best(configs) is None
    assert _CountingConfig.built == built
    assert "does not fit the candidates" in caplog.text


def test_a_public_key_pasted_as_the_hmac_secret_is_refused(ed_keys) -> None:  # noqa: ANN001
    """``keygen`` prints the public line for readers; pasted into BUNDLER_SIGNING_KEY it would be an
    HMAC secret everyone knows, so anyone could sign refs the readers accept."""
    for value in (str(ed_keys["new_inline"]), "ssh-ed25519 AAAAC3Nza", "-----BEGIN PUBLIC KEY-----"):
        with pytest.raises(ConfigError, match="BUNDLER_SIGNING_KEY holds what looks like a public key"):
            Settings(signing_key=value)


@pytest.mark.parametrize("depth", [40, 983, 990])
def test_a_deeply_nested_ref_is_refused_cleanly_and_never_blocks_a_push(store, base, depth: int) -> None:  # noqa: ANN001
    """Nested just under the JSON parser's limit, a ref's body broke the signature check's own
    encoding (RecursionError): readers crashed, and every later push to the ref failed."""
    writer = base.replace(signing_key="s3cret")
    signed = refs.write_ref(store, "prod", DIGEST_A, 10, settings=writer)
    key_id = signed.signature.split(":")[1]  # type: ignore[union-attr]
    nested = "[" * depth + "]" * depth
    raw = (f'{{"name":"prod","digest":"{DIGEST_B}","size":1,"created":"x","version":1,'
           f'"signature":"hmac-sha256:{key_id}:AAAA","extra":{{"x":{nested}}}}}')
    store.write_bytes(layout.ref_key("prod"), raw.encode())
    with pytest.raises((SignatureError, BundleError)):
        refs.read_ref(store, "prod", writer)
    again = refs.write_ref(store, "prod", DIGEST_A, 10, settings=writer)  # the producer can always fix it
    assert refs.read_ref(store, "prod", writer).version == again.version


def test_a_ref_copied_from_another_scope_signed_with_the_same_key_is_refused(store, base, tmp_path) -> None:  # noqa: ANN001
    """One key often signs staging and production. Whoever can write production's prefix copies
    staging's ref (and its bundle) in: with BUNDLER_SIGNING_SCOPE set, production refuses it."""
    staging = open_store((tmp_path / "staging").as_uri())
    writer = base.replace(signing_key="s3cret", cache_dir=base.cache_dir / "writer")
    refs.write_ref(store, "prod", DIGEST_A, 10, settings=writer.replace(signing_scope="prod"))
    refs.write_ref(staging, "prod", DIGEST_B, 10, settings=writer.replace(signing_scope="staging"))
    reader = base.replace(signing_key="s3cret", signing_scope="prod")
    assert refs.read_ref(store, "prod", reader).digest == DIGEST_A
    store.write_bytes(layout.ref_key("prod"), staging.read_bytes(layout.ref_key("prod")))  # the copy
    with pytest.raises(SignatureError, match="signed for scope 'staging', not 'prod'"):
        refs.read_ref(store, "prod", reader)
    # Without a scope the copy is a valid signed ref: the documented limit the setting closes.
    assert refs.read_ref(store, "prod", base.replace(signing_key="s3cret", cache_dir=tmp_path / "n2")).digest == DIGEST_B


def test_refs_signed_without_a_scope_still_verify(store, base) -> None:  # noqa: ANN001
    writer = base.replace(signing_key="s3cret")
    refs.write_ref(store, "prod", DIGEST_A, 10, settings=writer)
    assert "scope" not in json.loads(store.read_bytes(layout.ref_key("prod")))
    assert refs.read_ref(store, "prod", writer).digest == DIGEST_A
