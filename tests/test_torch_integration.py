"""torch.compile (Inductor) integration: real compiles in fresh processes, bundles over moto HTTP.

Grouped by what can go wrong:
- facts: the compatibility facts and the ref name they give (ISA, tag), computed without builds;
- refusal and explanation: a ref whose facts differ is refused before its bundle is read; a miss
  names the nearest bundle and the facts that differ;
- relocation: pickled cache entries pointed at another directory without being unpickled;
- failure policy: a dead store costs a warning, never the job;
- end to end (slow): a cold process compiles and pushes to moto over HTTP; a fresh process with
  empty caches at another path (the producer's directory renamed away) pulls and compiles nothing;
  an ISA or tag change misses and says why; strict mode fails a job the bundle does not cover.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from bundler.config import Settings  # noqa: E402
from bundler.integrations import torch as bt  # noqa: E402
from bundler.integrations.torch_relocate import relocate_entries, relocate_pickle  # noqa: E402
from bundler.remote import health, transfer  # noqa: E402
from bundler.stores import open_store  # noqa: E402

from conftest import REGION, _boto_client  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "tests" / "scripts" / "torch_compile_job.py"
FIXTURES = REPO / "tests" / "fixtures"


@pytest.fixture
def isolated_inductor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Inductor's cache and default (precompiled header) dirs inside tmp_path, restored after."""
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "ATEN_CPU_CAPABILITY", "BUNDLER_STRICT",
                 "BUNDLER_TAG", "BUNDLER_REMOTE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setenv("BUNDLER_CACHE_DIR", str(tmp_path / "bundler"))  # where pulls record what is unpacked
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path / "inductor"


def _build_header(monkeypatch: pytest.MonkeyPatch, pch: Path, body: bytes = b"precompiled") -> Path:
    """What Inductor's header build leaves, the way it does it: the ``.h`` through
    ``codecache.write`` into its header folder (what a session watches), then the ``.gch`` beside it."""
    from torch._inductor import codecache

    monkeypatch.setattr(codecache, "_HEADER_DIR", str(pch))  # Inductor computed its own at import
    _, path = codecache.write(f"#include <{body.hex()[:16]}.h>\n", "h", specified_dir=str(pch))
    Path(path + ".gch").write_bytes(body)
    return Path(path)


# --- facts ----------------------------------------------------------------------------------------


def test_facts_are_strings_and_name_the_isa(isolated_inductor: Path) -> None:
    facts = bt.environment_facts("t")
    assert all(isinstance(v, str) for v in facts.values())
    for name in bt.COMPAT_FACTS:
        assert name in facts
    assert facts["torch"] == torch.__version__ and facts["tag"] == "t"
    assert facts["cpu_isa"] == bt._picked_vec_isa(trial_builds=True), "the predicted ISA must be the one Inductor picks"


def test_isa_capability_and_tag_change_the_ref(isolated_inductor: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = bt.environment_facts("")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")  # Inductor then picks no vector ISA at all
    other_isa = bt.environment_facts("")
    assert other_isa["cpu_isa"] != base["cpu_isa"]
    assert bt.ref_name(other_isa) != bt.ref_name(base)
    assert any(d.startswith("cpu_isa ") for d in bt.fact_differences(other_isa, base))
    monkeypatch.delenv("ATEN_CPU_CAPABILITY")
    tagged = bt.environment_facts("v2")
    assert bt.ref_name(tagged) != bt.ref_name(base)
    assert bt.fact_differences(tagged, base) == ["tag v2 here, '' in the bundle"]
    assert bt.ref_name(base, "jobs/llama").startswith("jobs/llama/")


def test_cache_dirs_respect_the_user_and_default_like_inductor(
    isolated_inductor: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    dirs = bt.cache_dirs()
    assert dirs.inductor == isolated_inductor
    assert dirs.triton is None  # Triton's kernels live under <inductor>/triton/<device>
    assert dirs.pch == tmp_path / "tmp" / f"torchinductor_{_user()}" / "precompiled_headers"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "tri"))
    assert bt.cache_dirs().triton == tmp_path / "tri"
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    unset = bt.cache_dirs()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(unset.inductor)
    assert unset.pch == unset.inductor / "precompiled_headers"  # nested, yet its own layer
    (unset.pch / "locks").mkdir(parents=True)
    (unset.pch / "h.h.gch").write_bytes(b"x")
    (unset.inductor / "ab").mkdir()
    (unset.inductor / "ab" / "k.so").write_bytes(b"y")
    assert sorted(bt._capture(unset.layers())) == ["inductor/ab/k.so", "pch/h.h.gch"]


def _user() -> str:
    import getpass

    return getpass.getuser()


# --- refusal, explanation, failures ---------------------------------------------------------------


class _CountingStore:
    """A store wrapper that counts bundle reads, to prove preflight happens before any download."""

    def __init__(self, store) -> None:  # noqa: ANN001
        self._store, self.bundle_reads = store, 0
        self.url = store.url

    def open_read(self, key: str, **kwargs):  # noqa: ANN201
        if "/bundles/" in key:
            self.bundle_reads += 1
        return self._store.open_read(key, **kwargs)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._store, name)


def _push_fake(store, facts: dict, ref: str, files: dict | None = None) -> None:  # noqa: ANN001
    files = files or {"inductor/fxgraph/ab/fabc/entry": b"not a real entry"}
    transfer.push(store, files, ref=ref, producer=facts, ref_extra={"dirs": {"inductor": "/nowhere/inductor"}})


def test_preflight_refuses_a_ref_whose_facts_differ_before_downloading(
    isolated_inductor: Path, local_store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    facts = bt.environment_facts("")
    with open_store(local_store_url) as raw:
        _push_fake(raw, {**facts, "cpu_isa": "avx512"}, bt.ref_name(facts))  # the name says ours, facts lie
        store = _CountingStore(raw)
        session = bt.CompileCache(local_store_url, store=store).begin()
        assert session.status == "refused"
        assert session.reason.endswith(f"cpu_isa {facts['cpu_isa']} here, avx512 in the bundle")
        assert store.bundle_reads == 0
        assert not (isolated_inductor / "fxgraph").exists()
        session.end(failed=True)
    assert "refused bundle" in caplog.text


def test_miss_names_the_nearest_bundle_and_what_differs(isolated_inductor: Path, local_store_url: str) -> None:
    facts = bt.environment_facts("")
    elsewhere = {**facts, "cpu_isa": "avx512", "tag": "nightly"}
    with open_store(local_store_url) as store:
        _push_fake(store, elsewhere, bt.ref_name(elsewhere))
        _push_fake(store, {**facts, "torch": "2.12.1", "cpu_isa": "x", "tag": "y"}, "torch/far-away")
    line = bt.explain(local_store_url)
    assert line.startswith(f"miss: no bundle {bt.ref_name(facts)}; nearest bundle {bt.ref_name(elsewhere)}")
    assert "cpu_isa" in line and "tag '' here, nightly in the bundle" in line
    session = bt.CompileCache(local_store_url, push=False).begin()
    assert session.status == "miss" and "nearest bundle" in session.explanation
    session.end()
    assert "torch compile cache miss" in session.summary_line()


class _HeldListing:
    """A real store whose listings wait until the test releases them."""

    def __init__(self, store) -> None:  # noqa: ANN001
        self._store, self.release = store, __import__("threading").Event()
        self.url = store.url

    def list(self, prefix: str):  # noqa: ANN201
        self.release.wait(60)
        return self._store.list(prefix)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._store, name)


def test_a_miss_lets_the_first_compile_go_before_naming_the_nearest_bundle(
    isolated_inductor: Path, local_store_url: str
) -> None:
    """Naming the nearest bundle lists the prefix and reads up to 50 refs: on a real bucket, seconds
    that a cold compile must not wait for. The gate opens on the miss itself."""
    from bundler.integrations import torch_gate

    facts = bt.environment_facts("")
    elsewhere = {**facts, "tag": "nightly"}
    with open_store(local_store_url) as raw:
        _push_fake(raw, elsewhere, bt.ref_name(elsewhere))
        store = _HeldListing(raw)
        session = bt.CompileCache(local_store_url, store=store, push=False).begin()
        try:
            assert session.status == "miss"  # known while the listing is still held
            torch_gate.wait_pending()  # the first compile's wait: over, though no explanation yet
            assert not session._finished.is_set()
        finally:
            store.release.set()
        assert "tag '' here, nightly in the bundle" in session.explanation
        session.end()
    assert "nearest bundle" in session.summary_line()


def test_a_hit_lands_every_layer_where_inductor_looks(
    isolated_inductor: Path, local_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Default dirs (TORCHINDUCTOR_CACHE_DIR unset): the header layer nests inside the Inductor dir."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    facts = bt.environment_facts("")
    files = {"inductor/ab/cab.main.so": b"so", "inductor/fxgraph/ab/fkey/e": b"entry", "pch/c1.h.gch": b"gch",
             "inductor/triton/0/K/__grp__k.json": json.dumps({"child_paths": {"k.cubin": "/old/K/k.cubin"}}).encode()}
    with open_store(local_store_url) as store:
        _push_fake(store, facts, bt.ref_name(facts), files)
    session = bt.CompileCache(local_store_url).begin()
    assert session.status == "hit", session.reason
    root = session.dirs.inductor
    assert (root / "ab" / "cab.main.so").read_bytes() == b"so"
    assert (root / "precompiled_headers" / "c1.h.gch").read_bytes() == b"gch"
    group = json.loads((root / "triton" / "0" / "K" / "__grp__k.json").read_bytes())
    assert group["child_paths"]["k.cubin"] == str(root / "triton" / "0" / "K" / "k.cubin")
    session.end()
    assert "pushed" not in session.summary_line()  # a complete hit pushes nothing


class _HeldReads:
    """A real store whose reads of one key wait until the test releases them."""

    def __init__(self, store, key: str) -> None:  # noqa: ANN001
        self._store, self._key = store, key
        self.release = __import__("threading").Event()
        self.url = store.url

    def open_read(self, key: str, **kwargs):  # noqa: ANN201
        if key == self._key:
            self.release.wait(60)
        return self._store.open_read(key, **kwargs)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._store, name)


def _push_with_headers(store, facts: dict, headers: dict) -> str:  # noqa: ANN001
    """A ref as a cold session writes it: the headers in a bundle of their own, named in ``bundles``."""
    from bundler.remote import layout

    pushed = transfer.push(store, headers, producer=facts)
    entry = {"digest": pushed.digest, "size": pushed.size, "files": len(headers)}
    transfer.push(store, {"inductor/fxgraph/ab/fabc/entry": b"entry"}, ref=bt.ref_name(facts), producer=facts,
                  ref_extra={"dirs": {"inductor": "/nowhere/inductor"}, "bundles": {"pch": entry}})
    return layout.bundle_key(pushed.digest)


def test_the_header_bundle_lands_after_the_first_compile_but_before_a_header_build(
    isolated_inductor: Path, local_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first compile waits only for the main bundle; Inductor's header build (its write into
    the header folder) waits for the header bundle, so it finds the header and builds nothing."""
    import threading

    from torch._inductor import codecache

    facts = bt.environment_facts("")
    pch = bt.cache_dirs().pch
    assert pch is not None
    monkeypatch.setattr(codecache, "_HEADER_DIR", str(pch))  # Inductor computed its own at import
    with open_store(local_store_url) as raw:
        key = _push_with_headers(raw, facts, {"pch/c1.h": b"#include <x.h>\n", "pch/c1.h.gch": b"gch"})
        store = _HeldReads(raw, key)
        session = bt.CompileCache(local_store_url, store=store, push=False).begin()
        try:
            assert session.status == "hit", session.reason  # the main bundle alone releases the compile
            assert (isolated_inductor / "fxgraph" / "ab" / "fabc" / "entry").exists()
            assert not (pch / "c1.h.gch").exists()
            build = threading.Thread(target=codecache.write, args=("#include <y.h>\n", "h"),
                                     kwargs={"specified_dir": str(pch)})
            build.start()
            build.join(0.5)
            assert build.is_alive(), "the header build did not wait for the header bundle"
        finally:
            store.release.set()
        build.join(60)
        assert (pch / "c1.h.gch").read_bytes() == b"gch"
        session.end()
    assert "header build held" in session.summary_line()
    assert session.pulled_files == 3
    assert {"facts", "ref", "pull", "relocate", "snapshot", "headers"} <= set(session.timings)


def test_a_missing_header_bundle_still_hits(
    isolated_inductor: Path, local_store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Inductor builds headers it does not find: a lost header bundle costs a warning, not the hit."""
    facts = bt.environment_facts("")
    with open_store(local_store_url) as store:
        key = _push_with_headers(store, facts, {"pch/c1.h.gch": b"gch"})
        store.delete(key)
        session = bt.CompileCache(local_store_url, push=False).begin()
        assert session.status == "hit", session.reason
        session.wait(everything=True)  # end() of a session that pushes nothing does not wait for the headers
        session.end()
    assert "precompiled headers" in caplog.text and "not installed" in caplog.text
    assert not list(isolated_inductor.parent.rglob("c1.h.gch"))


def test_an_offline_copy_of_a_torch_ref_hits_with_its_headers_at_another_path(
    isolated_inductor: Path, local_store_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Air-gapped: `bundler export` of the ref and of its header bundle, `bundler import` of both
    into another store. The imported ref has no ``extra``, so the producer's directories and the
    header bundle must come from the manifest's own facts: the hit relocates and brings the header."""
    from bundler.remote.refs import read_ref

    producer_pch = bt.cache_dirs().pch
    session = bt.CompileCache(local_store_url, background=False).begin()
    assert session.status == "miss"
    entry = isolated_inductor / "fxgraph" / "ab" / "fkey" / "entry"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(pickle.dumps({"kernel": str(isolated_inductor / "xy" / "k.py")}, protocol=4))
    header = _build_header(monkeypatch, producer_pch)
    session.end()
    assert "pushed" in session.summary_line(), session.summary_line()

    offline = {}
    with open_store(local_store_url) as store:
        found = read_ref(store, session.ref, Settings())
        for name, kwargs in (("main", {"ref": session.ref}), ("pch", {"digest": found.producer["bundle.pch"]})):
            with open(tmp_path / f"{name}.tar.zst", "wb") as out:
                transfer.export(store, out, **kwargs)
            offline[name] = tmp_path / f"{name}.tar.zst"
    assert "also needs bundle" in caplog.text
    mirror_url = (tmp_path / "mirror").as_uri()
    with open_store(mirror_url) as mirror:
        transfer.import_file(mirror, str(offline["main"]), ref=session.ref)
        transfer.import_file(mirror, str(offline["pch"]))

    consumer = tmp_path / "consumer"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(consumer / "inductor"))
    monkeypatch.setattr(tempfile, "tempdir", str(consumer / "tmp"))
    (consumer / "tmp").mkdir(parents=True)
    warm = bt.CompileCache(mirror_url, background=False, push=False).begin()
    assert warm.status == "hit", warm.reason
    pch = warm.dirs.pch
    assert pch is not None and pch != producer_pch
    assert (pch / (header.name + ".gch")).read_bytes() == b"precompiled"
    moved = pickle.loads((consumer / "inductor" / "fxgraph" / "ab" / "fkey" / "entry").read_bytes())
    assert moved == {"kernel": str(consumer / "inductor" / "xy" / "k.py")}
    warm.end()


def test_a_ref_never_names_an_early_pushed_header_bundle_that_is_gone(
    isolated_inductor: Path, local_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header is pushed when the first compile returns; the ref is written at the end, maybe
    hours later, and gc may have collected the unnamed header bundle meanwhile. The end then
    pushes it again rather than link a missing bundle."""
    from bundler.integrations import torch_gate
    from bundler.remote import layout
    from bundler.remote.refs import linked_bundles, read_ref

    session = bt.CompileCache(local_store_url, background=False).begin()
    assert session.status == "miss"
    _build_header(monkeypatch, session.dirs.pch)
    torch_gate._run_after_compile()  # what the gate does when Inductor's compile returns
    assert session._early_thread is not None
    session._early_thread.join(60)
    early = session._early_headers[0]["digest"]
    with open_store(local_store_url) as store:
        store.delete(layout.bundle_key(early))  # a gc ran while the job trained
        (isolated_inductor / "fxgraph" / "ab").mkdir(parents=True)
        (isolated_inductor / "fxgraph" / "ab" / "entry").write_bytes(b"graph")
        session.end()
        found = read_ref(store, session.ref, Settings())
        linked = linked_bundles(found.extra, found.producer)["pch"]
        assert store.head(layout.bundle_key(linked)) is not None


def test_a_dead_store_costs_a_warning_not_the_job(isolated_inductor: Path, aws_env: None,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(connect_timeout=0.5, read_timeout=0.5, max_attempts=1)
    health.reset()
    try:
        session = bt.CompileCache("s3://nobucket/p?endpoint=http://127.0.0.1:9&addressing=path",
                                  settings=settings).begin()
        assert session.status == "error"
        session.end()
    finally:
        health.reset()
    assert "torch compile cache error" in session.summary_line()


# --- relocation -----------------------------------------------------------------------------------


class _Entry:
    """Stands in for Inductor's pickled objects (a LocalAutotuneCache holding a .best_config path)."""

    def __init__(self, **kw: object) -> None:
        self.__dict__.update(kw)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Entry) and self.__dict__ == other.__dict__


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_relocate_pickle_rewrites_paths_and_keeps_everything_else(protocol: int) -> None:
    old, new = "/producer/cache", "/a/much/longer/consumer/cache/dir"
    long_source = "# kernel path: /producer/cache/ab/cab.py\n" + "x = 1\n" * 100
    shared = f"{old}/df/d9.best_config"
    obj = {"caches": [_Entry(key=shared), _Entry(key=shared)], "same": shared, "src": long_source,
           "n": 3, "blob": b"/producer/cache in bytes stays", "other": "/elsewhere"}
    data = pickle.dumps(obj, protocol=protocol)
    out = relocate_pickle(data, {old: new})
    assert out is not None
    back = pickle.loads(out)
    assert back["caches"][0].key == f"{new}/df/d9.best_config"
    assert back["caches"][0] is back["caches"][1] or back["caches"][0] == back["caches"][1]
    assert back["src"] == long_source.replace(old, new) and back["n"] == 3 and back["other"] == "/elsewhere"
    if protocol >= 3:  # protocol 2 pickles bytes as a latin-1 str, which is rewritten like any str
        assert back["blob"] == b"/producer/cache in bytes stays"
    assert relocate_pickle(pickle.dumps({"a": "b"}), {old: new}) is None
    assert relocate_pickle(b"not a pickle /producer/cache", {old: new}) is None


@pytest.mark.parametrize("protocol", [4, 5])
def test_relocate_pickle_reaches_pickles_nested_in_bytes(protocol: int) -> None:
    """Inductor pickles statically launched kernels (cubin paths) into bytes inside the FX entry:
    left alone, a moved GPU cache recompiled every such kernel. Binary bytes stay untouched."""
    old, new = "/producer/cache", "/consumer/cache/at/another/path"
    kernel = pickle.dumps({"cubin_path": f"{old}/triton/0/AB/k.cubin", "n": 7}, protocol=protocol)
    deeper = pickle.dumps({"inner": pickle.dumps({"p": f"{old}/x" + "y" * 300}, protocol=protocol)}, protocol=protocol)
    binary = b"\x7fELF" + old.encode() + b"\0" * 8  # a cubin with the path in its debug info
    data = pickle.dumps({"kernels": [kernel, deeper], "cubin": binary}, protocol=protocol)
    back = pickle.loads(relocate_pickle(data, {old: new}))
    assert pickle.loads(back["kernels"][0]) == {"cubin_path": f"{new}/triton/0/AB/k.cubin", "n": 7}
    assert pickle.loads(pickle.loads(back["kernels"][1])["inner"])["p"].startswith(f"{new}/xyy")
    assert back["cubin"] == binary


def test_relocate_a_real_h200_fx_graph_entry(tmp_path: Path) -> None:
    """The fixture's FX entry holds .best_config paths; the rewrite must still parse (never unpickled)."""
    archive = FIXTURES / "default_caches.tar.gz"
    if not archive.exists():
        pytest.skip("fixtures not present")
    with tarfile.open(archive) as tar:
        member = next(m for m in tar.getmembers() if "/fxgraph/" in m.name and m.isfile())
        data = tar.extractfile(member).read()  # type: ignore[union-attr]
    old = "/tmp/probe_cache/default/inductor_cache_dir"
    assert data.count(b".best_config") > 0 and old.encode() in data
    out = relocate_pickle(data, {old: str(tmp_path / "here")})
    assert out is not None
    strings = [arg for op, arg, _ in pickletools.genops(io.BytesIO(out)) if isinstance(arg, str)]
    assert not any(old in s for s in strings)
    assert any(s.startswith(str(tmp_path / "here")) and s.endswith(".best_config") for s in strings)
    # in place, as after a pull
    entry = tmp_path / "ind" / "fxgraph" / "ab" / "fkey" / "entry"
    entry.parent.mkdir(parents=True)
    entry.write_bytes(data)
    assert relocate_entries(tmp_path / "ind", ["inductor/fxgraph/ab/fkey/entry"], {old: "/x"}) == 1
    assert old.encode() not in entry.read_bytes().split(b"runnable_graph_str")[0]


# --- end to end in fresh processes (slow) ---------------------------------------------------------


def _bundle_bytes(store, digest: str) -> bytes:  # noqa: ANN001
    """A stored bundle, decompressed: a plain tar stream."""
    import zstandard

    from bundler.remote import layout

    with store.open_read(layout.bundle_key(digest)) as stream:
        return zstandard.ZstdDecompressor().stream_reader(stream).read()


def _member_names(store, digest: str) -> list[str]:  # noqa: ANN001
    with tarfile.open(fileobj=io.BytesIO(_bundle_bytes(store, digest)), mode="r|*") as tar:
        return [member.name for member in tar]


def _job(url: str, root: Path, *args: str, env: dict | None = None, check: bool = True) -> dict:
    """The job with a ``compile_cache`` session on ``url``, in a fresh process (see :func:`_run`)."""
    return _run(root, ["--bundle", url, *args], env=env, check=check)


def _run(root: Path, argv: list[str], env: dict | None = None, check: bool = True) -> dict:
    """Run the job in a fresh process with its own Inductor dir and default (tmp) dir under root."""
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("BUNDLER_", "TORCHINDUCTOR_", "TRITON_", "AWS_", "ATEN_CPU"))}
    clean.update({
        "TMPDIR": str(root / "tmp"),  # Inductor's default dir, where precompiled headers go
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "TORCHINDUCTOR_COMPILE_THREADS": "1",  # C++ builds in-process, so the job can count them
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
        "PYTHONPATH": str(REPO) + os.pathsep + clean.get("PYTHONPATH", ""),
    })
    clean.update(env or {})
    proc = subprocess.run([sys.executable, str(JOB), *argv], env=clean,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("JOB-REPORT ")]
    report = json.loads(lines[-1][len("JOB-REPORT "):]) if lines else {}
    report["returncode"], report["stderr"] = proc.returncode, proc.stderr
    return report


@pytest.mark.slow
def test_bake_then_warm_start_elsewhere_then_misses_that_say_why(
    moto_endpoint: str, tmp_path: Path, aws_env: None
) -> None:
    """One bake, then every consumer of it (one test, so xdist never bakes twice)."""
    bucket = f"torch-{uuid.uuid4().hex[:12]}"
    _boto_client(moto_endpoint).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/caches?endpoint={moto_endpoint}&addressing=path"

    # 1. cold: compiles, pushes to moto over HTTP
    cold = _job(url, tmp_path / "producer")
    assert cold["session"]["status"] == "miss", cold["summary"]
    assert cold["inductor"]["fxgraph_cache_miss"] >= 1
    assert "pushed" in cold["summary"], cold["stderr"][-3000:]
    (tmp_path / "producer").rename(tmp_path / "producer.away")
    #    the precompiled headers went into a bundle of their own, which the ref names
    with open_store(url) as store:
        found = __import__("bundler.remote.refs", fromlist=["read_ref"]).read_ref(
            store, cold["session"]["ref"], Settings())
        headers = found.extra["bundles"]["pch"]
        main, pch = _member_names(store, found.digest), _member_names(store, headers["digest"])
    assert not any(name.startswith("pch/") for name in main), main
    assert any(name.endswith(".gch") for name in pch) and headers["files"] == len(pch) - 1, pch
    #    ... pushed while the job still ran (after the first compile built it), not at its end
    assert f"pushed the precompiled headers ({headers['digest'][:12]}" in cold["stderr"], cold["stderr"][-3000:]

    # 2. a fresh process, empty caches at another path, strict: compiles and builds nothing
    warm = _job(url, tmp_path / "consumer", "--strict")
    assert warm["session"]["status"] == "hit", warm["summary"]
    assert warm["inductor"].get("fxgraph_cache_miss", 0) == 0, warm["inductor"]
    assert warm["inductor"]["fxgraph_cache_hit"] >= 1
    assert warm["aot_autograd"].get("autograd_cache_miss", 0) == 0, warm["aot_autograd"]
    assert warm["aot_autograd"]["autograd_cache_hit"] >= 1
    assert [b for b in warm["cpp_builds"] if b != "header.i"] == [], warm["cpp_builds"]
    assert len(warm["cpp_builds"]) <= 1
    assert "C++ builds 0" in warm["summary"] and "pushed" not in warm["summary"]
    assert "never looked up: 0 of 2 FX graphs, 0 of 1 AOT entries" in warm["summary"], warm["summary"]
    assert warm["value"] == pytest.approx(cold["value"])
    assert not (tmp_path / "producer").exists(), "the producer's directory was re-created"
    #    the reads went through the store helper process: botocore never loaded in the job
    assert warm["botocore_imported"] is False, warm["stderr"][-3000:]

    # 2b. the fetch runs in the background: the first compile starts before the bundle is there
    #     (the download is held until then) and waits for it, so it still hits
    #     ... and the header bundle arrives while Inductor's header build waits for it
    held = _job(url, tmp_path / "held", "--strict", "--hold-fetch")
    assert held["session"]["gate_held"] is True, held["stderr"][-3000:]
    assert held["session"]["header_gate_held"] is True, held["stderr"][-3000:]
    assert [b for b in held["cpp_builds"] if b != "header.i"] == [], held["cpp_builds"]
    assert held["session"]["status"] == "hit", held["summary"]
    assert held["inductor"].get("fxgraph_cache_miss", 0) == 0, held["inductor"]
    assert held["aot_autograd"].get("autograd_cache_miss", 0) == 0, held["aot_autograd"]

    # 3. another CPU vector ISA: a miss (never the AVX2 bundle), and the explanation names the ISA
    isa = _job(url, tmp_path / "isa", "--dry", "--no-push", env={"ATEN_CPU_CAPABILITY": "default"})
    assert isa["session"]["status"] == "miss"
    assert "cpu_isa" in isa["session"]["explanation"], isa["session"]["explanation"]
    assert isa["botocore_imported"] is False  # the lookup and the explanation, through the helper
    assert not (tmp_path / "isa" / "inductor" / "fxgraph").exists()

    # 4. another tag: a miss that names the tag
    tag = _job(url, tmp_path / "tag", "--dry", "--no-push", "--tag", "other")
    assert tag["session"]["status"] == "miss"
    assert "tag other here, '' in the bundle" in tag["session"]["explanation"]

    # 5. strict mode fails a job the bundle does not cover (another model: the FX graph misses)
    broken = _job(url, tmp_path / "strict", "--strict", "--no-push", "--width", "16", "--layers", "1",
                  check=False)
    assert broken["returncode"] != 0
    assert "IncompleteWarmStart" in broken["stderr"] and "fxgraph_cache_miss=" in broken["stderr"]
    #    ... and says why its graphs missed inside the hit bundle: per missed FX graph, the nearest
    #    bundled graph and the components that differ; the summary names them
    explained = [line for line in broken["stderr"].splitlines() if " missed; nearest bundled graph " in line]
    assert explained and all(" differs in " in line for line in explained), broken["stderr"][-4000:]
    assert any("example_inputs[" in line for line in explained), explained
    summary = next(line for line in broken["stderr"].splitlines() if "torch compile cache hit; " in line)
    assert "FX misses explained (" in summary or "FX miss explained: " in summary, summary
    assert "example_inputs[" in summary.split("explained", 1)[1], summary


@pytest.mark.slow
def test_remote_backend_serves_entries_with_the_local_cache_empty(moto_endpoint: str, tmp_path: Path) -> None:
    """torch_remote: FX graph and AOTAutograd entries come from moto one by one; no setting changed."""
    bucket = f"torch-remote-{uuid.uuid4().hex[:8]}"
    _boto_client(moto_endpoint).create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/caches?endpoint={moto_endpoint}&addressing=path"
    small = ("--width", "16", "--layers", "1")
    first = _run(tmp_path / "first", ["--remote-cache", url, *small])
    assert first["remote_installed"] is True
    assert first["inductor"]["fxgraph_cache_miss"] >= 1
    keys = [o["Key"] for o in _boto_client(moto_endpoint).list_objects_v2(Bucket=bucket)["Contents"]]
    assert any(k.startswith("caches/v1/inductor/") for k in keys), keys
    second = _run(tmp_path / "second", ["--remote-cache", url, *small])
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0, second["inductor"]
    assert second["inductor"]["fxgraph_cache_hit"] >= 1
    assert second["aot_autograd"].get("autograd_cache_hit", 0) >= 1, second["aot_autograd"]
    assert "hit: 0" not in second["remote_cache_stats"].get("backend:StoreCacheBackend", "hit: 0")
    assert second["value"] == pytest.approx(first["value"])



def test_a_job_that_generated_no_cpu_code_pushes_without_isa_trial_builds(
    isolated_inductor: Path, local_store_url: str
) -> None:
    """The ISA check before a push must not make Inductor's pick itself: that runs a trial C++
    build per candidate ISA (44 s at the end of a GPU-only job on an H200). A fresh process whose
    job added cache files but generated no CPU code pushes and has built nothing."""
    script = f"""
import json, os, sys
from bundler.integrations import torch as bt
from torch._inductor import cpu_vec_isa
session = bt.CompileCache({local_store_url!r}).begin()
kernel = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "triton", "0", "K", "k.cubin")
os.makedirs(os.path.dirname(kernel))
open(kernel, "wb").write(b"a GPU kernel")
session.end()
print(json.dumps({{"summary": session.summary_line(),
                  "isa_picked": cpu_vec_isa.valid_vec_isa_list.cache_info().currsize}}))
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "pushed" in report["summary"], report
    assert report["isa_picked"] == 0
    assert not list(isolated_inductor.rglob("*.so")), "a trial build ran"


class _HeldStore:
    """A real store whose reads wait until the test releases them: a fetch caught mid-way."""

    def __init__(self, store) -> None:  # noqa: ANN001
        self._store, self.release = store, __import__("threading").Event()
        self.url = store.url

    def read_bytes(self, key: str, **kwargs):  # noqa: ANN201
        self.release.wait(60)
        return self._store.read_bytes(key, **kwargs)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._store, name)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork-only behaviour")
def test_a_forked_child_never_waits_for_the_parents_fetch(isolated_inductor: Path, local_store_url: str) -> None:
    """DataLoader workers fork while the session's fetch thread runs; a child has no such thread,
    so its compiles and its reads of the session must not wait for one (the full pull budget)."""
    from bundler.integrations import torch_gate

    with open_store(local_store_url) as raw:
        store = _HeldStore(raw)
        session = bt.CompileCache(local_store_url, store=store, push=False).begin()
        try:
            pid = os.fork()
            if pid == 0:  # the child: a gate with nothing pending, a session that does not block
                try:
                    torch_gate.wait_pending()
                    session.wait()
                    os._exit(0 if session.status in ("error", "off") else 3)
                finally:
                    os._exit(4)
            for _ in range(200):  # a hang guard (the child would block for the whole budget), not a timing
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    break
                __import__("time").sleep(0.1)
            else:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                pytest.fail("the forked child waited for the parent's fetch thread")
            assert os.waitstatus_to_exitcode(status) == 0
        finally:
            store.release.set()
            session.end()
    assert session.status == "miss"


# --- the job's own thread, ranks, and sessions that end early -------------------------------------


def test_settings_set_in_code_give_one_ref_in_the_background_and_in_the_foreground(
    isolated_inductor: Path, local_store_url: str
) -> None:
    """torch 2.13 keeps setting overrides per thread: the fetch thread must not compute the facts
    from the defaults. A job that set max_autotune before begin() gets its own ref whether the
    fetch runs in the background or not, and its ref's extra records the settings of begin time."""
    from bundler.remote.refs import read_ref

    def ref_of(background: bool) -> str:
        session = bt.CompileCache(settings=Settings(remote=None), background=background).begin()
        ref = session.ref
        session.end()
        return ref

    default = ref_of(True)
    with torch._inductor.config.patch(max_autotune=True):
        background, foreground = ref_of(True), ref_of(False)
        session = bt.CompileCache(local_store_url).begin()
        assert session.status == "miss"
    assert background == foreground != default
    assert session.ref == background
    (isolated_inductor / "ab").mkdir(parents=True)
    (isolated_inductor / "ab" / "k.main.so").write_bytes(b"built")
    session.end()  # the job's thread is out of the patch by now: the ref still says what it began with
    with open_store(local_store_url) as store:
        found = read_ref(store, session.ref, Settings())
    assert found.extra["inductor_settings"]["max_autotune"] == "True"
    assert found.producer["inductor_config"] == bt._settings_hash(found.extra["inductor_settings"])


@pytest.mark.parametrize("shared_state", [True, False], ids=["node-lock", "no-node-lock"])
def test_ranks_sharing_a_cache_dir_neither_repush_nor_fail_strict_mode(
    isolated_inductor: Path, local_store_url: str, tmp_path: Path, shared_state: bool
) -> None:
    """DDP ranks of one host share the cache dirs and hit the same bundle. With the node lock the
    later rank finds the bundle unpacked and reads none of it; without it (a state folder per
    rank) it unpacks again, writing the same bytes over files the first rank already counted:
    content, not mtimes, says nothing was added, so no rank pushes and strict mode passes."""
    facts = bt.environment_facts("")
    files = {"inductor/ab/cab.main.so": b"so" * 100, "inductor/fxgraph/ab/fkey/e": b"entry",
             "inductor/aotautograd/akey/e": b"aot"}
    if not shared_state:  # a relocated entry too: its bytes on disk are not the manifest's
        files["inductor/fxgraph/cd/fkey2/e"] = pickle.dumps({"kernel": "/producer/inductor/xy/k.py"}, protocol=4)
    with open_store(local_store_url) as raw:
        transfer.push(raw, files, ref=bt.ref_name(facts), producer=facts,
                      ref_extra={"dirs": {"inductor": "/producer/inductor"}})
        rank0 = bt.CompileCache(local_store_url, strict=True).begin()
        assert rank0.status == "hit", rank0.reason
        state = {} if shared_state else {"settings": Settings.from_env().replace(cache_dir=tmp_path / "rank1")}
        store = _CountingStore(raw)
        rank1 = bt.CompileCache(local_store_url, strict=True, store=store, **state).begin()
        assert rank1.status == "hit", rank1.reason
        rank1.end()
        assert store.bundle_reads == (0 if shared_state else 1)
        rank0.end()  # strict: raises IncompleteWarmStart if the rewritten files count as built
    assert rank0.pushed_bytes == 0 and "C++ builds 0" in rank0.summary_line()


class _FailingReader:
    """A store helper whose constructor fails the way a helper process that died at once does."""

    def __init__(self, settings: Settings) -> None:
        from bundler.errors import StoreUnreachableError

        raise StoreUnreachableError("the helper process reading the store stopped ([Errno 32] Broken pipe)")


@pytest.mark.parametrize("where", ["store constructor", "header gate"])
def test_begin_never_raises_and_takes_back_what_it_installed(
    isolated_inductor: Path, local_store_url: str, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, where: str,
) -> None:
    from bundler.integrations import torch_gate, torch_lookups
    from bundler.stores import proxy

    if where == "store constructor":
        monkeypatch.setattr(proxy, "wanted", lambda settings: True)
        monkeypatch.setattr(proxy, "ProxyStore", _FailingReader)
    else:
        def broken(*args: object, **kwargs: object) -> bool:
            raise AttributeError("module 'torch._inductor.codecache' has no attribute '_HEADER_DIR'")

        monkeypatch.setattr(torch_gate, "hold_headers_until", broken)
    session = bt.CompileCache(local_store_url).begin()
    assert session.status == "error"
    assert caplog.text.count("torch compile cache off: the session could not start") == 1
    assert session not in [getattr(r, "__self__", None) for r in torch_gate._after_compile]
    assert all(hold.ready is not session._done for hold in torch_gate._pending)
    assert torch_lookups.LookupRecorder.hooks._recorders == ()
    torch_gate.wait_pending()  # nothing left for a compile to wait for
    session.end()


@pytest.mark.parametrize("how", ["job failed", "nothing to push"])
def test_a_session_that_pushes_nothing_does_not_wait_for_the_miss_explanation(
    isolated_inductor: Path, local_store_url: str, how: str
) -> None:
    """Naming the nearest bundle lists the prefix (seconds on a real bucket, bounded only by the
    pull budget): a job that failed, or that will push nothing, must not wait for it at the end."""
    import time

    facts = bt.environment_facts("")
    with open_store(local_store_url) as raw:
        _push_fake(raw, {**facts, "tag": "nightly"}, "torch/elsewhere")
        store = _HeldListing(raw)
        try:
            started = time.monotonic()
            if how == "job failed":
                with pytest.raises(RuntimeError, match="out of memory"), \
                        bt.CompileCache(local_store_url, store=store) as session:
                    assert session.status == "miss"
                    raise RuntimeError("CUDA out of memory (the job's own error)")
            else:
                session = bt.CompileCache(local_store_url, store=store, push=False).begin()
                assert session.status == "miss"
                session.end()
            assert time.monotonic() - started < 10, "end() waited for the listing"
            assert not store.release.is_set()
        finally:
            store.release.set()


def test_only_this_jobs_headers_are_bundled_and_counted(
    isolated_inductor: Path, local_store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The header folder is Inductor's default one, shared by every job of the user: headers other
    jobs left there, or build meanwhile, are neither pushed with this job's bundle nor counted as
    this job's C++ builds in strict mode."""
    from bundler.remote.refs import read_ref

    pch = bt.cache_dirs().pch
    pch.mkdir(parents=True)
    (pch / "other_venv.h").write_text("#include <x.h>\n")
    (pch / "other_venv.h.gch").write_bytes(b"another job's header")
    session = bt.CompileCache(local_store_url).begin()
    assert session.status == "miss"
    ours = _build_header(monkeypatch, pch)
    (pch / "built_meanwhile.h.gch").write_bytes(b"another process's build")
    (isolated_inductor / "ab").mkdir(parents=True)
    (isolated_inductor / "ab" / "k.main.so").write_bytes(b"built by this job")
    session.end()
    with open_store(local_store_url) as store:
        found = read_ref(store, session.ref, Settings())
        assert found.extra["bundles"]["pch"]["files"] == 2  # ours: the .h and its .gch
        warm = bt.CompileCache(local_store_url, strict=True).begin()
        assert warm.status == "hit", warm.reason
        warm.wait(everything=True)  # the header bundle lands after the main one
        assert sorted(warm._headers_installed) == [f"pch/{ours.name}", f"pch/{ours.name}.gch"]
        (pch / "built_by_another_job.h.gch").write_bytes(b"a build that is not ours")
        warm.end()  # strict: raises if another job's header build counts as ours
    assert "C++ builds 0" in warm.summary_line()


def test_a_session_used_twice_says_so(isolated_inductor: Path, caplog: pytest.LogCaptureFixture) -> None:
    session = bt.compile_cache(settings=Settings(remote=None))
    with session:
        pass
    with session:
        pass
    assert "a CompileCache is used once" in caplog.text
