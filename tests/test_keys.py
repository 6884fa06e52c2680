"""Keys: what makes two compiles interchangeable, and what must not."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bundler import keys

from _helpers_triton import fake_gpu_driver

SOURCE = '''
def f(x):  # run 41 on /home/ci/a
    s = "# not a comment"

    return x + 1
'''


def test_code_hash_ignores_comments_blank_lines_and_indent_width() -> None:
    moved = SOURCE.replace("# run 41 on /home/ci/a", "# run 42 on /tmp/b").replace("\n\n", "\n\n\n\n")
    reindented = SOURCE.replace("    ", "  ")
    assert keys.code_hash(SOURCE) == keys.code_hash(moved) == keys.code_hash(reindented)


@pytest.mark.parametrize("change", [("x + 1", "x + 2"), ('"# not a comment"', '"# other"'), ("def f", "def g")])
def test_code_hash_sees_code_and_strings(change: tuple[str, str]) -> None:
    assert keys.code_hash(SOURCE) != keys.code_hash(SOURCE.replace(*change))


def test_code_hash_of_text_that_is_not_python_strips_hash_comments() -> None:
    cpp = "int main() {  // c++\n  return 0; # note\n"
    assert keys.code_hash(cpp) == keys.code_hash(cpp.replace("# note", "# other"))
    assert keys.code_hash(cpp) != keys.code_hash(cpp.replace("return 0", "return 1"))


def test_hash_parts_is_unambiguous() -> None:
    assert keys.hash_parts("ab", "c") != keys.hash_parts("a", "bc")


def test_compile_key_needs_exactly_one_of_code_and_hash() -> None:
    with pytest.raises(TypeError):
        keys.compile_key()
    with pytest.raises(TypeError):
        keys.compile_key(code="x", code_hash="y")
    assert keys.compile_key(code=SOURCE, salt="s") == keys.compile_key(code_hash=keys.code_hash(SOURCE), salt="s")


@pytest.mark.parametrize("change", [{"tag": "v2"}, {"triton": "2.3.1"}, {"backend": "cuda-90-32-12.8"}])
def test_version_salt_changes_with_each_fact(change: dict[str, str]) -> None:
    base = {"tag": "", "triton": "3.9.0", "backend": "cpu-interpreter-x86_64"}
    assert keys.version_salt(**base) != keys.version_salt(**{**base, **change})  # type: ignore[arg-type]


def test_bundle_format_version_is_part_of_the_salt(monkeypatch: pytest.MonkeyPatch) -> None:
    before = keys.version_salt("t", triton="3.9.0", backend="b")
    monkeypatch.setattr(keys, "BUNDLE_FORMAT_VERSION", keys.BUNDLE_FORMAT_VERSION + 1)
    assert keys.version_salt("t", triton="3.9.0", backend="b") != before


def test_backend_hash_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # holds on GPU machines too; no GPU here anyway
    keys.backend_hash.cache_clear()
    try:
        assert keys.backend_hash() == keys.interpreter_backend()
    finally:
        keys.backend_hash.cache_clear()
    assert keys.interpreter_backend().startswith("cpu-interpreter-")


def test_backend_hash_does_not_keep_a_fallback_that_came_from_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    answers: list[object] = [RuntimeError("cannot join current thread"), SimpleNamespace(backend="cuda", arch=90,
                                                                                          warp_size=32)]

    def driver_target() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    fake_gpu_driver(monkeypatch, driver_target)
    try:
        assert keys.backend_hash() == keys.interpreter_backend()  # a guess: asked again next time
        assert keys.backend_hash() == "cuda-90-32-ptxas-12.8"
        assert keys.backend_hash() == "cuda-90-32-ptxas-12.8"  # a real answer is kept
        assert not answers
    finally:
        keys.backend_hash.cache_clear()


def test_importing_the_package_loads_no_heavy_modules() -> None:
    code = (
        "import sys, bundler, bundler.session, bundler.autotune, bundler.artifacts, bundler.keys\n"
        "bundler.begin_compile\n"
        "heavy = [m for m in ('triton', 'torch', 'boto3', 'botocore') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
