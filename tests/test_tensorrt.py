"""TensorRT plan builder without a GPU: profile resolution and validation, cache keys, the build loop and plans.json
(with an injected builder), build_plan's TensorRT calls (against a recording stand-in module), and the CLI's
one-line exit-2 answer when TensorRT is absent."""

from __future__ import annotations

import argparse
import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from export import tensorrt as trtmod
from export.manifest import FORMAT, Component, DimRange, Manifest, Parity, TensorInfo, write_manifest
from export.tensorrt import (PlanBuildError, PlanOptions, ProfileError, ProfileSpec, ShapeRange, TensorRTUnavailable,
                             TrtEnvironment, build_plan, build_plans, component_entry_sha256, describe_parser_errors,
                             environment, parse_override, plan_key, plan_path, profiles_for, register)
from engine_ref.errors import InputError, ModelFilesError, TTSError

ENV = TrtEnvironment("NVIDIA H100 80GB HBM3", "10.3.0", "9.0")


def decoder(dims: dict[str, DimRange] | None = None, past_dims=("past", "past"), extra=None, name="gpt_step",
            sha="a" * 64) -> Component:
    """A 2-layer KV-cache decoder step: batch/past/total symbolic, heads a static named dim, head_dim literal."""
    base = {"batch": DimRange(1, 4, 16), "past": DimRange(0, 128, 600), "total": DimRange(1, 129, 601),
            "heads": DimRange(4, 4, 4)}
    base.update(dims or {})
    kv = []
    for layer, pdim in enumerate(past_dims):
        for kind in ("key", "value"):
            kv.append(TensorInfo(f"past_key_values.{layer}.{kind}", "float32", ("batch", "heads", pdim, 16)))
    return Component(
        name=name, file=f"{name}.onnx", sha256=sha, opset=17, precision="fp32",
        inputs=(TensorInfo("input_ids", "int64", ("batch", 1)),
                TensorInfo("attention_mask", "int64", ("batch", "total")), *kv),
        outputs=(TensorInfo("logits", "float32", ("batch", 1, 32)),),
        dims=base, parity=Parity(1e-6, 1e-6, 1e-4), extra=extra or {},
    )


def vocoder(sha="b" * 64) -> Component:
    return Component(
        name="vocoder", file="vocoder.onnx", sha256=sha, opset=17, precision="fp32",
        inputs=(TensorInfo("latent", "float32", ("batch", "frames", 64)),
                TensorInfo("speaker", "float32", ("batch", 1, 32))),
        outputs=(TensorInfo("wav", "float32", ("batch", 1, "samples")),),
        dims={"batch": DimRange(1, 1, 4), "frames": DimRange(1, 100, 1000), "samples": DimRange(1024, 102400, 1024000)},
        parity=None,
    )


# ---------------------------------------------------------------------------------------------------------------
# profiles


def test_default_profile_shapes_static_and_symbolic():
    (p,) = profiles_for(decoder(), PlanOptions())
    assert p.name == "default"
    assert p["input_ids"] == ShapeRange((1, 1), (4, 1), (16, 1))
    assert p["attention_mask"] == ((1, 1), (4, 129), (16, 601))
    assert p["past_key_values.1.value"] == ((1, 4, 0, 16), (4, 4, 128, 16), (16, 4, 600, 16))
    assert list(p) == [t.name for t in decoder().inputs]
    assert set(p.dims) == {"batch", "past", "total", "heads"}
    assert p.to_json()["shapes"]["input_ids"] == {"min": [1, 1], "opt": [4, 1], "max": [16, 1]}


def test_overrides_narrow_and_scope():
    opts = PlanOptions(overrides={"past": DimRange(0, 64, 256), "gpt_step/total": DimRange(1, 65, 257),
                                  "other/frames": DimRange(1, 2, 3)})
    (p,) = profiles_for(decoder(), opts)
    assert p["past_key_values.0.key"].max == (16, 4, 256, 16)
    assert p["attention_mask"] == ((1, 1), (4, 65), (16, 257))
    # an unchanged static dim may be restated
    (p,) = profiles_for(decoder(), PlanOptions(overrides={"heads": DimRange(4, 4, 4)}))
    assert p["past_key_values.0.key"].opt[1] == 4


def test_max_batch_caps_max_and_opt_only_on_batch_dims():
    (p,) = profiles_for(decoder(), PlanOptions(max_batch=2))
    assert p["input_ids"] == ((1, 1), (2, 1), (2, 1))
    assert p["attention_mask"].max == (2, 601)  # total untouched
    (p,) = profiles_for(decoder(), PlanOptions(max_batch=32))  # above the exported max: no change
    assert p["input_ids"].max == (16, 1)
    (p,) = profiles_for(decoder(), PlanOptions(max_batch=8, batch_dims=("total",)))
    assert p["attention_mask"] == ((1, 1), (4, 8), (16, 8))
    with pytest.raises(ProfileError, match=r"max_batch 1 is below the minimum 2 of batch dim 'batch'.*--max-batch 2"):
        profiles_for(decoder({"batch": DimRange(2, 4, 16)}), PlanOptions(max_batch=1))


@pytest.mark.parametrize("overrides, match", [
    ({"past": DimRange(0, 700, 600)}, r"dim 'past' in override 'past' \(0:700:600\) has opt 700 > max 600"),
    ({"past": DimRange(10, 5, 600)}, r"dim 'past' in override 'past' \(10:5:600\) has min 10 > opt 5"),
    ({"past": DimRange(-1, 5, 600)}, r"has min -1 < 0"),
    ({"pats": DimRange(0, 5, 600)}, r"names dim 'pats', which component 'gpt_step' does not have \(its dims: batch"),
    ({"gpt_step/pats": DimRange(0, 5, 6)}, r"names dim 'pats'"),
    ({"heads": DimRange(8, 8, 8)}, r"changes dim 'heads' of component 'gpt_step', which is static \(4\)"),
    ({"past": DimRange(0, 128, 2048)}, r"sets dim 'past' .* to 0..2048, outside the exported range 0..600"),
])
def test_override_validation_errors_name_dim_and_fix(overrides, match):
    with pytest.raises(ProfileError, match=match) as exc:
        profiles_for(decoder(), PlanOptions(overrides=overrides))
    assert "Fix: " in str(exc.value) and "\n" not in str(exc.value)


def test_manifest_validation_errors():
    with pytest.raises(ModelFilesError, match=r"dim 'past' of component 'gpt_step' in the manifest \(0:700:600\) has"):
        profiles_for(decoder({"past": DimRange(0, 700, 600)}), PlanOptions())
    comp = decoder()
    comp = replace(comp, dims={k: v for k, v in comp.dims.items() if k != "total"})
    with pytest.raises(ModelFilesError, match=r"input 'attention_mask' .* uses dim 'total', which has no range"):
        profiles_for(comp, PlanOptions())


def test_kv_cache_past_lengths_must_share_one_range():
    split = decoder({"past0": DimRange(0, 128, 600), "past1": DimRange(0, 128, 600)}, past_dims=("past0", "past1"))
    (p,) = profiles_for(split, PlanOptions())  # different names, same range: fine
    assert p["past_key_values.0.key"] == p["past_key_values.1.key"]
    with pytest.raises(ProfileError, match=r"'past_key_values.0.key' \(axis 2 = 'past0' 0:64:256\) and "
                                           r"'past_key_values.1.key' \('past1' 0:128:600\) must share one range"):
        profiles_for(split, PlanOptions(overrides={"past0": DimRange(0, 64, 256)}))
    bad = decoder({"past0": DimRange(0, 128, 600), "past1": DimRange(0, 128, 500)}, past_dims=("past0", "past1"))
    with pytest.raises(ProfileError, match="must share one range"):
        profiles_for(bad, PlanOptions())


def test_several_profiles_from_options_and_from_manifest_extra():
    sets = {"gpt_step": (ProfileSpec("prefill", {"past": DimRange(0, 0, 0), "total": DimRange(1, 64, 601)}),
                         ProfileSpec("decode", {"past": DimRange(1, 256, 600)}))}
    prefill, decode = profiles_for(decoder(), PlanOptions(profile_sets=sets, max_batch=8))
    assert (prefill.name, decode.name) == ("prefill", "decode")
    assert prefill["past_key_values.0.value"] == ((1, 4, 0, 16), (4, 4, 0, 16), (8, 4, 0, 16))
    assert decode["past_key_values.1.key"] == ((1, 4, 1, 16), (4, 4, 256, 16), (8, 4, 600, 16))
    assert decode["attention_mask"].max == (8, 601)
    extra = {"trt_profiles": [{"name": "small", "dims": {"batch": [1, 1, 2]}}, {"name": "large", "dims": {}}]}
    small, large = profiles_for(decoder(extra=extra), PlanOptions())
    assert small["input_ids"].max == (2, 1) and large["input_ids"].max == (16, 1)
    with pytest.raises(ProfileError, match=r"profile 'big' sets dim 'batch'.*outside the exported range"):
        profiles_for(decoder(extra={"trt_profiles": [{"name": "big", "dims": {"batch": [1, 1, 64]}}]}), PlanOptions())
    with pytest.raises(ModelFilesError, match="malformed extra.trt_profiles"):
        profiles_for(decoder(extra={"trt_profiles": [{"dims": {}}]}), PlanOptions())
    with pytest.raises(InputError, match="distinct names"):
        PlanOptions(profile_sets={"gpt_step": (ProfileSpec("a"), ProfileSpec("a"))})


def test_options_validation():
    for kwargs, match in (({"workspace_gib": 0}, "workspace_gib"), ({"builder_optimization_level": 6}, "0..5"),
                          ({"max_batch": 0}, "max_batch")):
        with pytest.raises(InputError, match=match):
            PlanOptions(**kwargs)


def test_parse_override():
    assert parse_override("past=0:64:512") == ("past", DimRange(0, 64, 512))
    assert parse_override("gpt_step/batch=4") == ("gpt_step/batch", DimRange(4, 4, 4))
    for bad in ("past", "past=1:2", "past=a:b:c", "=1:2:3"):
        with pytest.raises(InputError, match="DIM=MIN:OPT:MAX"):
            parse_override(bad)


# ---------------------------------------------------------------------------------------------------------------
# keys


def test_plan_key_stable_and_sensitive(tmp_path):
    opts = PlanOptions(overrides={"past": DimRange(0, 64, 256)})
    key = plan_key(ENV.gpu_name, ENV.trt_version, "m" * 64, "gpt_step", opts)
    assert key == plan_key(ENV.gpu_name, ENV.trt_version, "m" * 64, "gpt_step",
                           PlanOptions(overrides={"past": DimRange(0, 64, 256)}, timing_cache=tmp_path / "t.cache"))
    assert key.startswith("gpt_step-") and plan_path(tmp_path, key) == tmp_path / f"{key}.plan"
    variants = [
        plan_key("NVIDIA L4", ENV.trt_version, "m" * 64, "gpt_step", opts),
        plan_key(ENV.gpu_name, "10.4.0", "m" * 64, "gpt_step", opts),
        plan_key(ENV.gpu_name, ENV.trt_version, "n" * 64, "gpt_step", opts),
        plan_key(ENV.gpu_name, ENV.trt_version, "m" * 64, "gpt_step@fp16", opts),
        *(plan_key(ENV.gpu_name, ENV.trt_version, "m" * 64, "gpt_step", replace(opts, **kw)) for kw in (
            {"fp16": False}, {"workspace_gib": 8}, {"max_batch": 4}, {"builder_optimization_level": 5},
            {"overrides": {"past": DimRange(0, 64, 257)}}, {"profile_sets": {"gpt_step": (ProfileSpec("p"),)}})),
    ]
    assert len({key, *variants}) == len(variants) + 1
    assert plan_key(ENV.gpu_name, ENV.trt_version, "m" * 64, "a b@c", opts).startswith("a_b_c-")
    with pytest.raises(InputError):
        plan_path(tmp_path, "../escape")


def test_component_narrowing_keeps_other_components_keys():
    voc = vocoder()
    a = PlanOptions(overrides={"past": DimRange(0, 64, 256)}).for_component(voc)
    b = PlanOptions().for_component(voc)
    assert plan_key("g", "10", "m", "vocoder", a) == plan_key("g", "10", "m", "vocoder", b)
    c = PlanOptions(overrides={"batch": DimRange(1, 1, 2)}).for_component(voc)
    assert plan_key("g", "10", "m", "vocoder", c) != plan_key("g", "10", "m", "vocoder", b)
    assert component_entry_sha256(decoder()) == component_entry_sha256(replace(decoder(), parity=None))
    assert component_entry_sha256(decoder()) != component_entry_sha256(decoder(sha="c" * 64))


# ---------------------------------------------------------------------------------------------------------------
# build_plans with an injected builder


def write_export(root: Path, comps: list[Component]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for c in comps:
        (root / c.file).write_bytes(b"not really onnx")
    write_manifest(root, Manifest(FORMAT, 1, {"version": "tiny"}, {}, {c.name: c for c in comps}))
    return root


class FakeBuilder:
    def __init__(self, write: bool = True):
        self.calls: list[str] = []
        self.write = write

    def __call__(self, onnx_path: Path, comp: Component, opts: PlanOptions, out: Path) -> None:
        assert onnx_path.is_file()
        self.calls.append(comp.name)
        if self.write:
            out.write_bytes(f"plan:{comp.name}:{opts.fp16}".encode())


def test_build_plans_cache_is_a_noop_on_rerun(tmp_path):
    export = write_export(tmp_path / "export", [decoder(), vocoder()])
    cache = tmp_path / "cache"
    fake = FakeBuilder()
    opts = PlanOptions(max_batch=8, overrides={"past": DimRange(0, 64, 512)})
    plans = build_plans(export, cache, opts, builder=fake, env=ENV)
    assert sorted(fake.calls) == ["gpt_step", "vocoder"] and set(plans) == {"gpt_step", "vocoder"}
    index = json.loads((cache / "plans.json").read_text())
    assert index["gpu_name"] == ENV.gpu_name and index["trt_version"] == "10.3.0"
    entry = index["components"]["gpt_step"]
    assert entry["plan"] == plans["gpt_step"].name and (cache / entry["plan"]).read_bytes() == b"plan:gpt_step:True"
    assert entry["profiles"][0]["shapes"]["past_key_values.0.key"]["max"] == [8, 4, 512, 16]
    stamp = (cache / "plans.json").stat().st_mtime_ns

    fake2 = FakeBuilder()
    assert build_plans(export, cache, opts, builder=fake2, env=ENV) == plans
    assert fake2.calls == [] and (cache / "plans.json").stat().st_mtime_ns == stamp

    # a decoder-only override change rebuilds only the decoder; a new GPU rebuilds everything
    fake3 = FakeBuilder()
    build_plans(export, cache, replace(opts, overrides={"past": DimRange(0, 64, 256)}), builder=fake3, env=ENV)
    assert fake3.calls == ["gpt_step"]
    fake4 = FakeBuilder()
    build_plans(export, cache, opts, builder=fake4, env=replace(ENV, gpu_name="NVIDIA L4"))
    assert sorted(fake4.calls) == ["gpt_step", "vocoder"]


def test_build_plans_reexport_and_selection(tmp_path):
    export = write_export(tmp_path / "export", [decoder(), vocoder()])
    cache = tmp_path / "cache"
    build_plans(export, cache, PlanOptions(), builder=FakeBuilder(), env=ENV)
    write_export(export, [decoder(), vocoder(sha="d" * 64)])  # the vocoder was re-exported
    fake = FakeBuilder()
    build_plans(export, cache, PlanOptions(), builder=fake, env=ENV)
    assert fake.calls == ["vocoder"]
    fake = FakeBuilder()
    plans = build_plans(export, cache, PlanOptions(fp16=False), ["vocoder"], builder=fake, env=ENV)
    assert fake.calls == ["vocoder"] and list(plans) == ["vocoder"]
    # plans.json keeps the decoder entry from the earlier run and shows the new vocoder plan
    index = json.loads((cache / "plans.json").read_text())
    assert set(index["components"]) == {"gpt_step", "vocoder"}
    assert index["components"]["vocoder"]["fp16"] is False
    with pytest.raises(InputError, match=r"no component 'nope' \(it has: gpt_step, vocoder\)"):
        build_plans(export, cache, PlanOptions(), ["nope"], builder=FakeBuilder(), env=ENV)
    with pytest.raises(ProfileError, match=r"override 'past' matches no dim of the selected components \(vocoder\)"):
        build_plans(export, cache, PlanOptions(overrides={"past": DimRange(0, 1, 2)}), ["vocoder"],
                    builder=FakeBuilder(), env=ENV)
    with pytest.raises(PlanBuildError, match="produced no plan"):
        build_plans(export, tmp_path / "cache2", PlanOptions(), builder=FakeBuilder(write=False), env=ENV)


def test_build_plans_validates_before_needing_tensorrt(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    export = write_export(tmp_path / "export", [decoder()])
    with pytest.raises(ProfileError, match="pats"):
        build_plans(export, tmp_path / "cache", PlanOptions(overrides={"pats": DimRange(0, 1, 2)}))
    with pytest.raises(TensorRTUnavailable, match="TensorRT is not available"):
        build_plans(export, tmp_path / "cache", PlanOptions())
    with pytest.raises(ModelFilesError, match="does not exist"):
        build_plans(tmp_path / "missing", tmp_path / "cache", PlanOptions(), env=ENV, builder=FakeBuilder())


# ---------------------------------------------------------------------------------------------------------------
# environment and build_plan against a recording stand-in for the tensorrt module


def fake_trt(record: dict, version: str = "10.3.0", parse_ok: bool = True, inputs=()) -> types.ModuleType:
    m = types.ModuleType("tensorrt")
    m.__version__ = version
    m.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, sev: None})
    m.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    m.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
    m.BuilderFlag = types.SimpleNamespace(FP16="fp16")

    class Err:
        def __init__(self, idx, desc):
            self.idx, self.d = idx, desc

        def node(self):
            return self.idx

        def desc(self):
            return self.d

    class Parser:
        def __init__(self, network, logger):
            self.errors = [] if parse_ok else [Err(1, "unsupported op"), Err(-1, "graph broken")]

        def parse_from_file(self, path):
            record["parsed"] = path
            return parse_ok

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Config:
        def __init__(self):
            record.update(flags=[], profiles=[])

        def set_memory_pool_limit(self, pool, size):
            record["pool"] = (pool, size)

        def set_flag(self, flag):
            record["flags"].append(flag)

        def add_optimization_profile(self, prof):
            record["profiles"].append(prof.shapes)

    class Prof:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            record["network_flags"] = flags
            tensors = [types.SimpleNamespace(name=n, shape=s) for n, s in inputs]
            return types.SimpleNamespace(num_inputs=len(tensors), get_input=lambda i: tensors[i])

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Prof()

        def build_serialized_network(self, network, config):
            record["level"] = config.builder_optimization_level
            return b"SERIALIZED"

    m.OnnxParser, m.Builder = Parser, Builder
    return m


def test_environment_errors_and_success(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailable, match=r"^TensorRT is not available \(import tensorrt failed: .*Fix: .*NGC"):
        environment()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt({}, version="8.6.1"))
    with pytest.raises(TensorRTUnavailable, match="TensorRT 8.6.1 is installed, this builder needs 10"):
        environment()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt({}))

    def no_gpu():
        raise TensorRTUnavailable("no CUDA GPU visible (test)", "use a GPU node")

    with pytest.raises(TensorRTUnavailable, match="no CUDA GPU visible"):
        environment(probe_gpu=no_gpu)
    assert environment(probe_gpu=lambda: ("NVIDIA H200", "9.0")) == TrtEnvironment("NVIDIA H200", "10.3.0", "9.0")


def test_cuda_probe_answers_or_says_no_gpu():
    try:
        name, cc = trtmod.cuda_gpu()
    except TensorRTUnavailable as exc:
        assert "no CUDA GPU visible" in str(exc)
    else:
        assert name and "." in cc


def test_build_plan_sets_profiles_flags_and_writes_atomically(tmp_path, monkeypatch):
    record: dict = {}
    comp = decoder()
    dyn = [(t.name, tuple(-1 if isinstance(d, str) and d != "heads" else (4 if d == "heads" else d) for d in t.shape))
           for t in comp.inputs]
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(record, inputs=dyn))
    sets = {"gpt_step": (ProfileSpec("prefill", {"past": DimRange(0, 0, 0)}), ProfileSpec("decode"))}
    opts = PlanOptions(workspace_gib=1.5, builder_optimization_level=4, profile_sets=sets)
    out = build_plan(tmp_path / "g.onnx", comp, opts, tmp_path / "plans" / "x.plan")
    assert out.read_bytes() == b"SERIALIZED" and [p.name for p in out.parent.iterdir()] == ["x.plan"]
    assert record["pool"] == ("workspace", int(1.5 * (1 << 30))) and record["flags"] == ["fp16"]
    assert record["network_flags"] == 0 and record["level"] == 4 and record["parsed"] == str(tmp_path / "g.onnx")
    prefill, decode = record["profiles"]
    assert prefill["past_key_values.0.key"] == ((1, 4, 0, 16), (4, 4, 0, 16), (16, 4, 0, 16))
    assert decode["input_ids"] == ((1, 1), (4, 1), (16, 1))
    # int8 graphs are strongly typed: no FP16 flag
    build_plan(tmp_path / "g.onnx", replace(comp, precision="int8"), PlanOptions(), tmp_path / "y.plan")
    assert record["network_flags"] == 1 and record["flags"] == []
    # a dynamic graph input the manifest does not know
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt(record, inputs=[*dyn, ("extra", (-1,))]))
    with pytest.raises(ModelFilesError, match=r"dynamic input\(s\) extra"):
        build_plan(tmp_path / "g.onnx", comp, PlanOptions(), tmp_path / "z.plan")


def tiny_onnx(path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="first_relu"),
             helper.make_node("Erf", ["h"], ["y"], name="odd_erf")]
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y])), str(path))
    return path


def test_parser_errors_name_the_onnx_nodes(tmp_path, monkeypatch):
    graph = tiny_onnx(tmp_path / "g.onnx")
    monkeypatch.setitem(sys.modules, "tensorrt", fake_trt({}, parse_ok=False))
    with pytest.raises(PlanBuildError, match=r"cannot parse g.onnx of component 'gpt_step': node 'odd_erf' \(Erf\): "
                                             r"unsupported op; graph: graph broken\. Fix: re-export"):
        build_plan(graph, decoder(), PlanOptions(), tmp_path / "x.plan")
    assert not (tmp_path / "x.plan").exists()
    parser = sys.modules["tensorrt"].OnnxParser(None, None)
    parser.errors = parser.errors * 3
    assert describe_parser_errors(parser, graph).endswith("(+3 more)")


# ---------------------------------------------------------------------------------------------------------------
# CLI


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_without_tensorrt_prints_one_line_and_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    export = write_export(tmp_path / "export", [decoder(), vocoder()])
    code = cli(["build-plans", "--export", str(export), "--cache", str(tmp_path / "cache"), "--max-batch", "4",
                "--override", "past=0:64:512", "--no-fp16"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: TensorRT is not available") and "Fix:" in err
    assert not (tmp_path / "cache").exists()


def test_cli_check_and_bad_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    export = write_export(tmp_path / "export", [decoder(), vocoder()])
    base = ["build-plans", "--export", str(export), "--cache", str(tmp_path / "cache")]
    assert cli([*base, "--check", "--max-batch", "2", "--override", "gpt_step/past=0:64:512"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "gpt_step profile 0 'default': batch=1:2:2, past=0:64:512, total=1:129:601, heads=4:4:4" in out
    assert any(line.startswith("vocoder profile 0 'default': batch=1:1:2") for line in out)
    for extra, match in ((["--override", "past=1:2"], "DIM=MIN:OPT:MAX"), (["--max-batch", "0"], "max_batch"),
                         (["--check", "--override", "heads=8"], "static"),
                         (["--check", "--component", "x"], "no component")):
        assert cli([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1


def test_errors_are_tts_errors():
    for cls in (TensorRTUnavailable, ProfileError, PlanBuildError):
        assert issubclass(cls, TTSError)
