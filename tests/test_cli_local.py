"""The local CLI contract: stdout carries only the result, stderr one clear line, stable exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bundles import honest, write_tree

FILES = {"k1/kern.cubin": os.urandom(5000), "k1/kern.json": b'{"num_warps": 8}', "k2/x.ptx": b".version 8.4\n" * 50}


def bundler(*args: str, stdin: bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bundler.cli", *args], input=stdin, capture_output=True,
        env={**os.environ, **(env or {})}, timeout=120,
    )


@pytest.fixture
def packed(tmp_path: Path) -> tuple[Path, str]:
    write_tree(tmp_path / "src", FILES)
    out = tmp_path / "b.tar.zst"
    result = bundler("pack", str(tmp_path / "src"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    digest = result.stdout.decode().strip()
    return out, digest


def test_pack_prints_only_the_digest(packed):
    out, digest = packed
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert out.stat().st_size > 0
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".part")]


def test_unpack_verify_inspect_round_trip(packed, tmp_path):
    out, digest = packed
    result = bundler("unpack", str(out), "--into", str(tmp_path / "dest"), "--digest", digest)
    assert result.returncode == 0, result.stderr
    assert {n: (tmp_path / "dest" / n).read_bytes() for n in FILES} == FILES
    result = bundler("verify", str(out), "--digest", digest)
    assert result.returncode == 0 and result.stdout.decode().startswith(f"ok {digest} 3 files")
    result = bundler("inspect", str(out), "--json")
    doc = json.loads(result.stdout)
    assert doc["digest"] == digest and doc["files"] == 3
    assert [f["path"] for f in doc["file_list"]] == sorted(FILES)
    assert doc["producer"]["bundler"]
    text = bundler("inspect", str(out)).stdout.decode()
    assert f"digest:     {digest}" in text and "files:      3" in text


def test_unpack_from_stdin(packed, tmp_path):
    out, digest = packed
    result = bundler("unpack", "-", "--into", str(tmp_path / "d2"), stdin=out.read_bytes())
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "d2/k2/x.ptx").read_bytes() == FILES["k2/x.ptx"]


def test_missing_file_exits_3(tmp_path):
    result = bundler("unpack", str(tmp_path / "nope.tar.zst"), "--into", str(tmp_path / "d"))
    assert result.returncode == 3
    assert b"nope.tar.zst" in result.stderr and result.stderr.count(b"\n") == 1


def test_usage_errors_exit_2(tmp_path):
    assert bundler("unpack", "x").returncode == 2
    assert bundler("verify", "x", "--digest", "not-hex").returncode == 2
    assert bundler("frobnicate").returncode == 2


def test_bad_setting_exits_2_naming_the_variable(packed):
    out, _ = packed
    result = bundler("verify", str(out), env={"BUNDLER_MAX_MEMBERS": "lots"})
    assert result.returncode == 2 and b"BUNDLER_MAX_MEMBERS" in result.stderr


def test_integrity_failure_exits_4_and_writes_nothing(packed, tmp_path):
    out, digest = packed
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    result = bundler("unpack", str(out), "--into", str(tmp_path / "dest"), "--digest", wrong)
    assert result.returncode == 4 and wrong.encode() in result.stderr
    assert not (tmp_path / "dest").exists()
    hostile = tmp_path / "h.tar.zst"
    hostile.write_bytes(honest({"a": b"1"})[0][:-20])
    assert bundler("verify", str(hostile)).returncode == 4


def test_local_commands_do_not_import_boto3(packed, tmp_path):
    out, _ = packed
    code = (
        "import sys; from bundler.cli import main; rc = main(sys.argv[1:]);"
        "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, 'boto imported'; sys.exit(rc)"
    )
    for args in (["unpack", str(out), "--into", str(tmp_path / "x")], ["verify", str(out)], ["inspect", str(out)]):
        result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr


def test_pack_to_stdout_keeps_the_digest_off_the_bundle(tmp_path):
    write_tree(tmp_path / "src", FILES)
    result = bundler("pack", str(tmp_path / "src"), "-o", "-")
    assert result.returncode == 0
    digest = result.stderr.decode().strip().splitlines()[-1]
    verified = bundler("verify", "-", "--digest", digest, stdin=result.stdout)
    assert verified.returncode == 0, verified.stderr


def test_pack_output_is_readable_by_others_and_flags_go_anywhere(tmp_path):
    write_tree(tmp_path / "src", FILES)
    out = tmp_path / "b.tar.zst"
    assert bundler("pack", str(tmp_path / "src"), "-o", str(out), "--quiet").returncode == 0
    assert out.stat().st_mode & 0o044 == 0o044  # mkstemp's 0600 would keep a shared bundle private
    result = bundler("pack", str(tmp_path / "src"), "-o", str(tmp_path / "no" / "b"))
    assert result.returncode == 1 and b"does not exist" in result.stderr


def test_progress_bar_only_on_a_terminal(tmp_path):
    import pty

    write_tree(tmp_path / "src", {"big.bin": os.urandom(6 << 20)})
    store = (tmp_path / "store").as_uri()
    assert bundler("push", str(tmp_path / "src"), "--remote", store, "--ref", "r").stderr == b""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bundler.cli", "pull", "--ref", "r", "--remote", store, "--into", str(tmp_path / "d")],
        stdout=subprocess.PIPE, stderr=terminal,
    )
    os.close(terminal)
    seen = _drain(controller, proc)
    assert proc.returncode == 0
    assert b"pull:" in seen and b"/6.00M" in seen, seen  # a tqdm bar, sized from the object


def _drain(controller: int, proc: subprocess.Popen) -> bytes:
    """Everything the child writes to the terminal, read while it runs (a full pty would block it)."""
    import select

    seen = b""
    while True:
        ready, _, _ = select.select([controller], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the child closed its end
                chunk = b""
            seen += chunk
            if chunk:
                continue
        if proc.poll() is not None and not ready:
            break
        if ready and not chunk:
            proc.wait(timeout=60)
            break
    os.close(controller)
    return seen


def test_closed_pipe_is_quiet(tmp_path):
    write_tree(tmp_path / "many", {f"k{i}/f.json": b"{}" for i in range(3000)})  # more than a pipe holds
    out = tmp_path / "many.tar.zst"
    assert bundler("pack", str(tmp_path / "many"), "-o", str(out)).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "bundler.cli", "inspect", "--files", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()  # like `| head -1`
    assert proc.wait(timeout=60) in (0, 1)
    assert b"error" not in proc.stderr.read()


def test_ls_of_a_missing_store_folder_is_a_miss(tmp_path):
    result = bundler("ls", "--remote", str(tmp_path / "typo"))
    assert result.returncode == 3 and b"does not exist" in result.stderr


@pytest.mark.parametrize("columns", ["50", "120"])
def test_help_fits_the_terminal_width(columns):
    """Help is wrapped to $COLUMNS like any argparse program (we size it without shutil)."""
    result = bundler("unpack", "--help", env={"COLUMNS": columns})
    assert result.returncode == 0
    lines = result.stdout.decode().splitlines()
    assert max(len(line) for line in lines) <= int(columns)
    if columns == "120":  # wide enough that the usage fits on one line
        assert lines[0].startswith("usage: bundler unpack") and lines[0].rstrip().endswith("file")


@pytest.mark.parametrize("closed", [1, 2])
def test_exit_code_survives_a_closed_stdout_or_stderr(packed, closed):
    """`bundler verify b >&-` in a script: no output possible, but the exit code still counts."""
    bundle, _ = packed
    for args, code in ((["verify", str(bundle)], 0), (["verify", str(bundle), "--digest", "0" * 64], 4)):
        result = subprocess.run(
            [sys.executable, "-m", "bundler.cli", *args], capture_output=True, timeout=120,
            preexec_fn=lambda: os.close(closed),  # noqa: PLW1509 - the child starts with the descriptor closed
        )
        assert result.returncode == code, result.stderr


def test_python_dash_m_bundler_and_help_lists_exit_codes_env_and_examples():
    result = subprocess.run([sys.executable, "-m", "bundler", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for text in ("exit codes:", "3 not found", "BUNDLER_REMOTE", "BUNDLER_REF", "BUNDLER_LOG",
                 "bundler warm --ref", "bundler gc --keep-last"):
        assert text in result.stdout, text
    verb = bundler("gc", "--help")
    assert b"example:\n  bundler gc --keep-last 5" in verb.stdout and b"exit codes:" in verb.stdout


def test_a_typo_gets_did_you_mean():
    result = bundler("pus", "x")
    assert result.returncode == 2 and b"did you mean 'push'?" in result.stderr
    assert b"Traceback" not in result.stderr


def test_push_of_an_empty_directory_is_refused_unless_allowed(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    store = (tmp_path / "store").as_uri()
    refused = bundler("push", str(tmp_path / "empty"), "--remote", store, "--ref", "x")
    assert refused.returncode == 2 and b"holds no files" in refused.stderr and b"--allow-empty" in refused.stderr
    assert not (tmp_path / "store").exists()  # refused before anything was written
    allowed = bundler("push", str(tmp_path / "empty"), "--remote", store, "--ref", "x", "--allow-empty")
    assert allowed.returncode == 0, allowed.stderr


def test_cache_view_and_prune(tmp_path):
    cache = tmp_path / "cache"
    write_tree(cache, {"autotune/old.json": b"{}", "autotune/new.json": b"{}", "pulled/x.manifest.json": b"m",
                       "refs-seen/abc": b"7"})
    old = 1_000_000_000
    for name in ("autotune/old.json", "pulled/x.manifest.json", "refs-seen/abc"):
        os.utime(cache / name, (old, old))
    env = {"BUNDLER_CACHE_DIR": str(cache)}
    view = json.loads(bundler("cache", "--json", "--older-than", "30d", env=env).stdout)
    assert view["folders"]["autotune"] == {"entries": 2, "bytes": 4, "old": 1} and view["pruned"] == []
    assert bundler("cache", "--prune", env=env).returncode == 2  # what is old is the user's call
    pruned = bundler("cache", "--prune", "--older-than", "30d", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file()) == [
        "autotune/new.json", "refs-seen/abc"]  # replay protection is never pruned


def test_bundler_log_gives_jobs_one_prefixed_handler(tmp_path):
    code = ("import logging, bundler; s = bundler.CompileSession(code_hash='x'); "
            "logging.getLogger('bundler.session').warning('w' * 10); "
            "print(len(logging.getLogger('bundler').handlers))")
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "BUNDLER_LOG": ""})
    assert quiet.stdout.strip() == "0"  # unset: no handler of ours; the app's logging decides
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "BUNDLER_LOG": "info"})
    assert loud.stdout.strip() == "1" and loud.stderr == "bundler: WARNING: wwwwwwwwww\n"


def test_local_commands_import_no_dataclasses(packed, tmp_path):
    """dataclasses (with inspect, ast, dis) costs a bundler command ~25 ms of CPU; pack and unpack
    need it only to report a misuse."""
    out, _ = packed
    code = (
        "import sys; from bundler.cli import main; rc = main(sys.argv[1:]);"
        "heavy = {'dataclasses', 'secrets'} & set(sys.modules);"
        "assert not heavy, heavy; sys.exit(rc)"
    )
    for args in (["unpack", str(out), "--into", str(tmp_path / "x")], ["pack", str(tmp_path / "x"), "-o",
                 str(tmp_path / "again.tar.zst")]):
        result = subprocess.run([sys.executable, "-S", "-c", code, *args], capture_output=True, timeout=60,
                                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        assert result.returncode == 0, result.stderr


def test_local_commands_log_what_was_asked_for_and_only_that(packed, tmp_path):
    out, _ = packed
    loud = bundler("-v", "unpack", str(out), "--into", str(tmp_path / "a"))
    assert loud.returncode == 0 and loud.stderr.decode().startswith("bundler: INFO: unpacked ")
    assert bundler("unpack", str(out), "--into", str(tmp_path / "b")).stderr == b""
    # A warning from inside the bundle layer (a leftover staging folder swept) reaches stderr with
    # our prefix at INFO, and not at the default WARNING level.
    dest = tmp_path / "c"
    (dest / ".bundler-staging-otherhost-1-abc").mkdir(parents=True)
    os.utime(dest / ".bundler-staging-otherhost-1-abc", (1, 1))
    swept = bundler("-v", "unpack", str(out), "--into", str(dest))
    assert "bundler: INFO: removing " in swept.stderr.decode(), swept.stderr
    (dest / ".bundler-staging-otherhost-2-abc").mkdir()
    os.utime(dest / ".bundler-staging-otherhost-2-abc", (1, 1))
    assert bundler("unpack", str(out), "--into", str(dest)).stderr == b""


def test_main_gives_the_garbage_collector_back(packed, tmp_path):
    import gc

    from bundler.cli import main

    out, _ = packed
    assert gc.isenabled()
    assert main(["unpack", str(out), "--into", str(tmp_path / "x")]) == 0
    assert gc.isenabled()
    assert main(["unpack", str(tmp_path / "missing"), "--into", str(tmp_path / "y")]) == 3
    assert gc.isenabled()


# --- output files, bad input files, and what the messages say (the CLI review) -------------------


def test_an_existing_output_is_kept_unless_force(packed, tmp_path):
    """`-o FILE` onto an existing file (the copy on removable media) is refused, not overwritten."""
    precious = tmp_path / "precious.txt"
    precious.write_bytes(b"important\n")
    result = bundler("pack", str(tmp_path / "src"), "-o", str(precious))
    assert result.returncode == 2 and str(precious).encode() in result.stderr and b"--force" in result.stderr
    assert precious.read_bytes() == b"important\n"
    out, digest = packed
    forced = bundler("pack", str(tmp_path / "src"), "-o", str(precious), "--force")
    assert forced.returncode == 0 and forced.stdout.decode().strip() == digest
    assert precious.read_bytes() == out.read_bytes()
    to_stdout = bundler("pack", str(tmp_path / "src"), "-o", "-")
    assert to_stdout.returncode == 0 and to_stdout.stdout == out.read_bytes()


def test_a_bundle_is_not_written_to_a_terminal(tmp_path):
    import pty

    write_tree(tmp_path / "src", FILES)
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-m", "bundler.cli", "pack", str(tmp_path / "src"), "-o", "-"],
                              stdout=terminal, stderr=subprocess.PIPE, timeout=120)
    finally:
        os.close(terminal)
        os.close(controller)
    assert proc.returncode == 2 and b"stdout is a terminal; redirect it or give -o FILE" in proc.stderr


def test_pack_refuses_an_output_inside_the_packed_folder(tmp_path):
    write_tree(tmp_path / "src", FILES)
    result = bundler("pack", str(tmp_path / "src"), "-o", str(tmp_path / "src" / "out.tar.zst"))
    assert result.returncode == 2 and b"inside" in result.stderr and b"outside" in result.stderr
    assert sorted(p.name for p in (tmp_path / "src").iterdir()) == ["k1", "k2"]


def test_output_that_is_a_directory_is_a_usage_error(tmp_path):
    write_tree(tmp_path / "src", FILES)
    (tmp_path / "out").mkdir()
    for force in ((), ("--force",)):
        result = bundler("pack", str(tmp_path / "src"), "-o", str(tmp_path / "out"), *force)
        assert result.returncode == 2 and b"is a directory" in result.stderr and b".part" not in result.stderr


def test_a_failed_write_names_the_output_not_the_temp_file(tmp_path):
    """A write that fails (here: over RLIMIT_FSIZE, as a full disk would) names -o and why; no .part is left."""
    import resource

    write_tree(tmp_path / "src", {"big.bin": os.urandom(200_000)})
    out = tmp_path / "out.tar.zst"
    proc = subprocess.run(
        [sys.executable, "-m", "bundler.cli", "pack", str(tmp_path / "src"), "-o", str(out)], capture_output=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000)), timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith(f"bundler: error: cannot write {out}: ".encode()) and b"size limit" in proc.stderr
    assert b".part" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_keygen_into_a_missing_folder_says_so(tmp_path):
    result = bundler("keygen", str(tmp_path / "nodir" / "k"))
    assert result.returncode == 1
    assert f"cannot write {tmp_path / 'nodir' / 'k'}: folder {tmp_path / 'nodir'} does not exist".encode() in result.stderr


@pytest.mark.parametrize("verb", ["verify", "inspect", "unpack"])
def test_a_bad_bundle_file_is_named_with_what_to_do(verb, packed, tmp_path):
    out, _ = packed
    bad = tmp_path / "notb.txt"
    bad.write_bytes(b"not a bundle\n")
    truncated = tmp_path / "trunc.tar.zst"
    truncated.write_bytes(out.read_bytes()[:100])
    extra = ("--into", str(tmp_path / "d")) if verb == "unpack" else ()
    for path in (bad, truncated):
        result = bundler(verb, str(path), *extra)
        assert result.returncode == 4, result.stderr
        assert result.stderr.startswith(f"bundler: error: {path}: not a bundle".encode()), result.stderr
        assert result.stderr.rstrip().endswith(b"copy or export it again")
    piped = bundler(verb, "-", *extra, stdin=out.read_bytes()[:100])
    assert piped.returncode == 4 and piped.stderr.startswith(b"bundler: error: stdin: not a bundle")
    folder = bundler(verb, str(tmp_path / "src"), *extra)
    assert folder.returncode == 2 and b"is a directory, not a bundle file" in folder.stderr


def test_import_names_a_bad_file_and_reads_stdin(packed, tmp_path):
    out, digest = packed
    mirror = (tmp_path / "mirror").as_uri()
    bad = tmp_path / "notb.txt"
    bad.write_bytes(b"not a bundle\n")
    result = bundler("import", str(bad), "--remote", mirror)
    assert result.returncode == 4 and result.stderr.startswith(f"bundler: error: {bad}: not a bundle".encode())
    assert b"copy or export it again" in result.stderr
    folder = bundler("import", str(tmp_path / "src"), "--remote", mirror)
    assert folder.returncode == 2 and b"is a directory" in folder.stderr
    piped = bundler("import", "-", "--ref", "from/stdin", "--remote", mirror, stdin=out.read_bytes())
    assert piped.returncode == 0 and piped.stdout.decode().strip() == digest, piped.stderr
    shown = bundler("show", "from/stdin", "--remote", mirror)
    assert f"digest:       {digest}".encode() in shown.stdout and b"extra.imported_from: stdin" in shown.stdout
    cut = bundler("import", "-", "--remote", mirror, stdin=out.read_bytes()[:100])
    assert cut.returncode == 4 and cut.stderr.startswith(b"bundler: error: stdin: not a bundle")


def test_level_is_checked_by_the_parser(tmp_path):
    write_tree(tmp_path / "src", FILES)
    result = bundler("pack", str(tmp_path / "src"), "-o", str(tmp_path / "z.tar.zst"), "--level", "99")
    assert result.returncode == 2 and b"--level" in result.stderr and b"BUNDLER_ZSTD_LEVEL" not in result.stderr
    assert bundler("pack", str(tmp_path / "src"), "-o", str(tmp_path / "z.tar.zst"), "--level", "19").returncode == 0


def test_a_missing_store_folder_is_said_so_by_every_reader(packed, tmp_path):
    typo = str(tmp_path / "typo")
    for args in (("ls",), ("show", "r"), ("pull", "--ref", "r", "--into", str(tmp_path / "d")),
                 ("export", "--ref", "r", "-o", str(tmp_path / "x.tar.zst")), ("rm", "r")):
        result = bundler(*args, "--remote", typo)
        assert result.returncode == 3, (args, result.stderr)
        assert f"store folder {typo} does not exist".encode() in result.stderr, (args, result.stderr)
        assert b"bundler ls" not in result.stderr, (args, result.stderr)
    assert not (tmp_path / "x.tar.zst").exists() and not (tmp_path / "typo").exists()
