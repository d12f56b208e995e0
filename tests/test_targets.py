"""Target resolution and grouping (the function list-modules and train share)."""

from __future__ import annotations

import pytest

from kimi_lora_cli.errors import TargetError
from kimi_lora_cli.targets import group_entries, linear_entries, resolve_targets, whisper_shape


@pytest.fixture()
def entries(tiny, tiny_dir):
    return linear_entries(tiny.model, whisper_config=whisper_shape(tiny_dir))


def names(entries, spec):
    return resolve_targets(entries, spec).names


def test_all_excludes_whisper_and_heads(entries, tiny):
    cfg = tiny.config
    got = names(entries, "all")
    assert len(got) == 7 * (cfg.num_hidden_layers + cfg.kimia_mimo_layers) + 2
    assert not any(n.startswith("whisper") or n in ("lm_head", "mimo_output") for n in got)


def test_components(entries, tiny):
    k = tiny.config.kimia_mimo_transformer_from_layer_index
    assert {int(n.split(".")[2]) for n in names(entries, "backbone")} == set(range(k + 1))
    assert {int(n.split(".")[2]) for n in names(entries, "text")} == set(range(k + 1, tiny.config.num_hidden_layers))
    assert all(n.startswith("model.mimo_layers.") for n in names(entries, "mimo"))
    assert names(entries, "adaptor") == ["model.vq_adaptor.layers.0", "model.vq_adaptor.layers.3"]
    assert names(entries, "heads") == ["lm_head", "mimo_output"]


def test_suffix_does_not_confuse_adaptor_with_layers(entries):
    assert names(entries, "vq_adaptor.layers.0") == ["model.vq_adaptor.layers.0"]
    got = names(entries, "layers.0.self_attn.q_proj")
    assert got == ["model.layers.0.self_attn.q_proj", "model.mimo_layers.0.self_attn.q_proj"] or got == [
        "model.layers.0.self_attn.q_proj"
    ]
    assert "model.vq_adaptor.layers.0" not in names(entries, "model.layers.{0-3}.*")
    assert names(entries, "model.layers.0.self_attn.q_proj") == ["model.layers.0.self_attn.q_proj"]


def test_plain_globs_braces_regex_ranges(entries):
    assert len(names(entries, "q_proj,v_proj")) == 2 * 6
    assert names(entries, "model.layers.{1-2}.self_attn.q_proj") == [
        "model.layers.1.self_attn.q_proj", "model.layers.2.self_attn.q_proj"]
    assert names(entries, "q_proj:0-1") == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                                            "model.mimo_layers.0.self_attn.q_proj",
                                            "model.mimo_layers.1.self_attn.q_proj"]
    assert names(entries, "mimo:1,q_proj:3") == sorted(
        [n for n in names(entries, "mimo") if ".1." in n] + ["model.layers.3.self_attn.q_proj"])
    assert len(names(entries, "*.mlp.*")) == 3 * 6
    assert names(entries, r"re:model\.mimo_layers\.\d+\.mlp\.down_proj") == [
        "model.mimo_layers.0.mlp.down_proj", "model.mimo_layers.1.mlp.down_proj"]


def test_unknown_target_lists_closest(entries):
    with pytest.raises(TargetError, match="closest names: q_proj"):
        resolve_targets(entries, "q_prj")
    with pytest.raises(TargetError, match="Whisper is frozen"):
        resolve_targets(entries, "fc1")
    with pytest.raises(TargetError, match="bad layer range"):
        resolve_targets(entries, "q_proj:x-1")


def test_group_patterns(entries, tiny):
    resolve_targets(entries, "all")
    groups = {g.pattern: g for g in group_entries(entries)}
    k = tiny.config.kimia_mimo_transformer_from_layer_index
    g = groups[f"model.layers.{{0-{k}}}.self_attn.q_proj"]
    assert g.count == k + 1 and g.component == "backbone" and g.targeted == g.count
    assert groups["lm_head"].targeted == 0 and groups["lm_head"].excluded_reason
