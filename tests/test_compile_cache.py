"""An upgrade that changes an op's schema or fake rules does not reuse graphs compiled against the old
ones: our component of ``torch.compiler.config.cache_key_tag`` follows the op schemas and the fake rules'
sources, and torch's FX graph cache key follows the tag (torch does not key on custom ops itself)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

import fused_attention
from fused_attention import compile_cache


def _fresh(script: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_import_tags_the_compile_caches_with_version_and_schemas():
    tag = torch.compiler.config.cache_key_tag
    assert f"fused_attention={fused_attention.__version__}+" in tag
    assert any(s.startswith("fused_attention::torch_attention(") for s in compile_cache.op_schemas())
    # In a fresh process (here, other tests may have registered more ops since the import):
    assert _fresh(
        "import torch, fused_attention\nfrom fused_attention import compile_cache\n"
        "print(compile_cache.cache_tag() in torch.compiler.config.cache_key_tag.split('|'))"
    ) == "True"


def test_ops_registered_after_import_retag_the_caches():
    assert _fresh(
        "import os; os.environ['TRITON_INTERPRET'] = '1'\n"
        "import torch, fused_attention\nfrom fused_attention import compile_cache\n"
        "before = torch.compiler.config.cache_key_tag\n"
        "import fused_attention.ops.triton_attention\n"
        "after = torch.compiler.config.cache_key_tag\n"
        "print(before != after and compile_cache.cache_tag() in after.split('|'))"
    ) == "True"


def test_tagging_keeps_the_users_tag_and_replaces_ours():
    with torch.compiler.config.patch(cache_key_tag="mine|fused_attention=0.0.1+stale"):
        compile_cache.tag_compile_caches()
        compile_cache.tag_compile_caches()
        assert torch.compiler.config.cache_key_tag == "mine|" + compile_cache.cache_tag()


def test_changed_op_schema_changes_the_tag():
    # A fresh process, so the extra op does not outlive the test.
    script = """
import torch, fused_attention
from fused_attention import compile_cache
before = compile_cache.cache_tag()
lib = torch.library.Library("fused_attention", "FRAGMENT")
lib.define("schema_probe(Tensor x, int n) -> Tensor")
print(before != compile_cache.cache_tag())
"""
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_every_module_registering_an_op_rule_is_hashed():
    package = Path(fused_attention.__file__).resolve().parent
    registering = {
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if re.search(r"\.register_(fake|autograd)\(|register_(fake|autograd)\(", path.read_text())
        and path.name != "compile_cache.py"
    }
    assert {"ops/attention_rules.py", "ops/position_rules.py", "_extension.py"} <= registering, "the scan is broken"
    assert registering <= set(compile_cache.RULE_SOURCES), registering - set(compile_cache.RULE_SOURCES)
    for relative in compile_cache.RULE_SOURCES:
        assert (package / relative).is_file(), relative


def test_changed_fake_rule_changes_the_tag(monkeypatch):
    """A fake rule's change (here, of what lays out the outputs) keys graphs afresh, with the version and
    the schemas unchanged."""
    before = compile_cache.cache_tag()
    read = compile_cache._read_source
    monkeypatch.setattr(compile_cache, "_read_source",
                        lambda relative: read(relative) + (b"#" if relative == "kernels/layout.py" else b""))
    compile_cache.rules_digest.cache_clear()
    try:
        assert compile_cache.cache_tag() != before
    finally:
        monkeypatch.undo()
        compile_cache.rules_digest.cache_clear()
    assert compile_cache.cache_tag() == before


def test_fx_graph_cache_key_follows_the_tag():
    from torch._inductor.codecache import compiled_fx_graph_hash  # what Inductor keys its cache with

    gm = torch.fx.symbolic_trace(lambda x: x + 1)
    x = torch.randn(3)

    def key(tag: str) -> str:
        with torch.compiler.config.patch(cache_key_tag=tag):
            return compiled_fx_graph_hash(gm, [x], {}, [])[0]

    assert key("fused_attention=1+a") == key("fused_attention=1+a")
    assert key("fused_attention=1+a") != key("fused_attention=1+b")
