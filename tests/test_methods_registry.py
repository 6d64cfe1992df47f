"""The method registry as a whole: every method is complete (paper, cuts, criterion, preset), keeps its budget,
is the unmodified model at retain 1, and its preset reproduces its defaults exactly."""

from __future__ import annotations

import pytest
import torch

from streamprune import ConfigError
from streamprune.reduce import METHODS, outer_retain, reduce_tokens
from streamprune.reduce.inner_cuts import InnerConfig, method_inner, validate
from streamprune.reduce.methods import INNER, KV_CACHE, PRE_LLM
from streamprune.reduce.presets import PRESET_DIR, load_preset, resolve_method
from streamprune.tokens import Fate

ISSUE_METHODS = {"none", "uniform", "random", "visionzip", "dycoke", "prunevid", "fastvid", "dtd", "evs", "fastv",
                 "fastervlm", "divprune", "todre", "mmtok", "holov", "aim", "feather", "transprune", "hiprune",
                 "flowcut", "holitom"}


def token_set(t: int = 6, n: int = 36, d: int = 16, seed: int = 0):
    """A small video: a drifting background with a moving bright patch, and an attention map that follows it."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, d, generator=gen)
    feats = base[None].repeat(t, 1, 1) + 0.05 * torch.randn(t, n, d, generator=gen)
    for f in range(t):
        feats[f, (3 * f) % n] += 4.0
    attention = torch.rand(t, n, generator=gen)
    return feats, attention, (6, 6)


def test_the_registry_holds_every_method_the_zoo_promises():
    assert ISSUE_METHODS <= set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_is_described(name):
    m = METHODS[name]
    assert m.name == name and m.paper and set(m.cuts) <= {PRE_LLM, INNER, KV_CACHE}
    assert len(m.criterion) > 20
    assert (m.reduce is not None) == (PRE_LLM in m.cuts) or name == "none"
    assert (m.inner is not None) == bool({INNER, KV_CACHE} & set(m.cuts))


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("retain", [0.25, 0.1])
def test_every_method_keeps_its_budget_before_the_llm(name, retain):
    feats, attention, grid = token_set()
    text = torch.randn(5, feats.shape[-1])
    out = reduce_tokens(name, feats, attention, grid, retain, text=text)
    t, n, _ = feats.shape
    share = outer_retain(name, retain)
    expected = t * n if share >= 1.0 else max(1, round(share * t * n))
    assert len(out) == expected and int(out.size.sum()) == t * n
    assert ((out.fate == Fate.KEPT).sum() == len(out))  # one representative per output token
    assert torch.equal(out.origin[out.frame, out.position], torch.arange(len(out)))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_retain_one_is_the_unmodified_model(name):
    feats, attention, grid = token_set()
    out = reduce_tokens(name, feats, attention, grid, 1.0)
    assert torch.equal(out.features, feats.reshape(-1, feats.shape[-1])) and len(out) == feats.shape[0] * feats.shape[1]
    inner = method_inner(METHODS[name], 1.0, InnerConfig(proportional=False), 24)
    assert not inner.active


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_has_a_preset_that_reproduces_its_defaults(name):
    preset, options, _ = load_preset(PRESET_DIR / f"{name}.yaml")
    assert preset == name
    feats, attention, grid = token_set(seed=1)
    plain = reduce_tokens(name, feats, attention, grid, 0.25)
    configured = reduce_tokens(name, feats, attention, grid, 0.25, **options)
    assert torch.equal(plain.features, configured.features) and torch.equal(plain.origin, configured.origin)
    for layers in (6, 24, 28):  # its cuts inside fit decoders of these depths, with or without the preset
        spec = METHODS[name]
        a = method_inner(spec, 0.25, InnerConfig(), layers)
        b = method_inner(spec, 0.25, InnerConfig(), layers, **options)
        assert a == b
        validate(a, layers)


def test_methods_that_cut_inside_end_at_their_budget():
    def remaining(inner: InnerConfig) -> float:
        kept = 1.0
        for step in inner.schedule(24):
            kept *= 1 - step.ratio
        return kept

    for name in ("fastv", "feather", "transprune"):  # inner only: all of retain is the inner schedule's
        assert remaining(method_inner(METHODS[name], 0.1, InnerConfig(), 24)) == pytest.approx(0.1)
    # PruneVid: the merge before keeps retain / 0.4, the cut at layer 10 keeps 0.4 of that
    assert outer_retain("prunevid", 0.1) == pytest.approx(0.25)
    assert remaining(method_inner(METHODS["prunevid"], 0.1, InnerConfig(), 24)) == pytest.approx(0.4)
    # ToDRE and AIM remove every visual token deep inside, as their papers do
    assert remaining(method_inner(METHODS["todre"], 0.1, InnerConfig(), 24)) == 0.0
    assert remaining(method_inner(METHODS["aim"], 0.1, InnerConfig(), 24)) == 0.0
    assert method_inner(METHODS["dycoke"], 0.25, InnerConfig(), 28).kv.layer == 3


def test_a_method_with_its_own_inner_cuts_refuses_a_second_inner_stage():
    with pytest.raises(ConfigError, match="makes its own cuts"):
        method_inner(METHODS["fastv"], 0.25, InnerConfig(mode="holitom"), 24)
    # pure pruning methods attend to their survivors as they are; merging methods keep proportional attention
    assert not method_inner(METHODS["divprune"], 0.25, InnerConfig(), 24).proportional
    assert method_inner(METHODS["holitom"], 0.25, InnerConfig(), 24).proportional


def test_resolving_method_names_and_presets(tmp_path):
    assert resolve_method("visionzip") == ("visionzip", {}, None)
    name, options, _ = resolve_method("dycoke")  # a registry name wins over its preset
    assert name == "dycoke" and options == {}
    preset = tmp_path / "strong.yaml"
    preset.write_text("method: dycoke\nretain: 0.1\noptions:\n  kv_prune: 0.9\n")
    assert resolve_method(str(preset)) == ("dycoke", {"kv_prune": 0.9}, 0.1)
    for bad, message in ((tmp_path / "missing.yaml", "not found"), ("nope", "unknown method")):
        with pytest.raises(ConfigError, match=message):
            resolve_method(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("options: {}\n")
    with pytest.raises(ConfigError, match="method:"):
        resolve_method(str(broken))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("method: nope\n")
    with pytest.raises(ConfigError, match="unknown method"):
        resolve_method(str(unknown))
