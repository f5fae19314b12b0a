"""Export packages: ``ditfx.export`` writes plan + weights + AOTInductor artifacts, ``ditfx.load`` runs them with
the ditfx runtime and no compiler, exactly as the optimized model runs (fp32, 1e-5), and refuses what it cannot
serve: wrong inputs, tampered or foreign packages."""
import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import ditfx
from conftest import tiny_model
from ditfx.package.manifest import PackageError

pytestmark = [pytest.mark.usefixtures("fresh_dynamo"), pytest.mark.slow]  # AOTInductor builds

# exports here compile in this process (jobs=1): the other test workers keep the other cores busy

STEPS = 8


def demo_config(compiler="eager"):
    from ditfx.demo import DemoSettings, demo_config

    return ditfx.Config(**{**demo_config(DemoSettings()).__dict__, "compiler": compiler})


@pytest.fixture(scope="module")
def digits_package(tmp_path_factory):
    """The digits DiT exported with the demo's config (static cache, Adaptive Guidance) for 10 samples x CFG."""
    from ditfx.models import digits

    path = tmp_path_factory.mktemp("pkg") / "digits"
    model = digits.load_transformer()
    example = {"hidden_states": torch.randn(20, 1, 16, 16), "timestep": torch.ones(20),
               "class_labels": torch.arange(20) % 11, "return_dict": False}
    lines = []
    ditfx.export(model, path, example_inputs=example, config=demo_config(), progress=lines.append, jobs=1)
    assert lines[0].startswith("capturing") and lines[-1].startswith("wrote")
    torch._dynamo.reset()
    return path


def sample(transformer, seed=0, per_class=1):
    from ditfx.models import digits
    from ditfx.models.digits.sampling import class_grid

    pipe = digits.DigitsPipeline(transformer, digits.make_scheduler())
    if hasattr(transformer, "ditfx_runtime"):  # a loaded package: the pipeline's scheduler counts its steps
        pipe = ditfx.optimize(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe(class_grid(per_class), num_inference_steps=STEPS, guidance_scale=1.5,
                generator=torch.Generator().manual_seed(seed)).images


def test_the_package_holds_what_the_manifest_says(digits_package):
    manifest = json.loads((digits_package / "manifest.json").read_text())
    assert manifest["format"] == "ditfx.package/1" and manifest["torch"] == torch.__version__
    assert manifest["device"] == "cpu" and manifest["model_class"].endswith("DiTTransformer2DModel")
    files = set(manifest["files"])
    assert {"call.json", "weights.safetensors", "plan/plan.json"} <= files
    artifacts = {f for f in files if f.startswith("artifacts/")}
    programs = {f for f in files if f.startswith("programs/")}
    # prologue, block, block with its cached residual, epilogue, epilogue measuring guidance: one each, batch dynamic
    assert len(artifacts) == 5 and {a.replace("artifacts/", "programs/") for a in artifacts} == programs
    plan = json.loads((digits_package / "plan" / "plan.json").read_text())
    assert {a["rows"] for a in plan["artifacts"]} == {"dynamic"}
    assert {p["type"] for p in plan["policies"]} == {"StaticCache", "AdaptiveGuidance"}
    exported = torch.export.load(digits_package / sorted(programs)[0])
    assert isinstance(exported, torch.export.ExportedProgram)  # a package can be recompiled for another target


def test_the_loaded_pipeline_equals_the_optimized_one(digits_package):
    from ditfx.models import digits

    optimized = ditfx.optimize(digits.load_transformer(), demo_config())
    expected = sample(optimized)
    loaded = ditfx.load(digits_package)
    got = sample(loaded)
    assert (got - expected).abs().max() <= 1e-5
    a, b = ditfx.stats(optimized), ditfx.stats(loaded)
    assert (a.block_evals, a.nfe, a.flops) == (b.block_evals, b.nfe, b.flops) and b.nfe < 2 * STEPS
    assert b.region_compiles == 0 and b.graphs == 0
    # another batch size over the same dynamic-batch artifacts, and a second generation equal to a fresh one
    assert (sample(loaded, seed=1, per_class=2) - sample(optimized, seed=1, per_class=2)).abs().max() <= 1e-5
    assert (sample(loaded) - expected).abs().max() <= 1e-5


def test_a_loaded_pipeline_after_a_call_aborted_at_step_0_starts_a_new_generation(digits_package):
    from ditfx.models import digits
    from ditfx.models.digits.sampling import class_grid

    class Abort(Exception):
        pass

    def abort(pipe, i, t, kwargs):
        raise Abort()

    pipe = ditfx.optimize(digits.DigitsPipeline(ditfx.load(digits_package), digits.make_scheduler()))
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(Abort):
        pipe(class_grid(1), num_inference_steps=STEPS, guidance_scale=1.5, callback_on_step_end=abort,
             generator=torch.Generator().manual_seed(5))
    got = pipe(class_grid(1), num_inference_steps=STEPS, guidance_scale=1.5,
               generator=torch.Generator().manual_seed(0)).images
    assert (got - sample(ditfx.load(digits_package))).abs().max() <= 1e-5
    assert ditfx.stats(pipe).generations == 2


def test_a_fresh_process_runs_the_digits_pipeline_from_the_package(digits_package, tmp_path):
    """No Dynamo, no Inductor, no model code: only the package and the runtime (then the pipeline, whose diffusers
    imports Dynamo itself)."""
    out = tmp_path / "images.pt"
    script = textwrap.dedent(f"""
        import sys, torch, ditfx
        model = ditfx.load({str(digits_package)!r})
        x = torch.randn(20, 1, 16, 16)
        model(hidden_states=x, timestep=torch.full((20,), 500.0), class_labels=torch.arange(20) % 11,
              return_dict=False)
        heavy = [m for m in ("torch._dynamo", "torch._inductor", "triton", "diffusers") if m in sys.modules]
        from ditfx.models import digits
        from ditfx.models.digits.sampling import class_grid
        pipe = ditfx.optimize(digits.DigitsPipeline(model, digits.make_scheduler()))
        pipe.set_progress_bar_config(disable=True)
        images = pipe(class_grid(1), num_inference_steps={STEPS}, guidance_scale=1.5,
                      generator=torch.Generator().manual_seed(0)).images
        torch.save({{"images": images, "heavy": heavy}}, {str(out)!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    result = torch.load(out, weights_only=True)
    assert result["heavy"] == []
    from ditfx.models import digits

    expected = sample(ditfx.optimize(digits.load_transformer(), demo_config()))
    assert (result["images"] - expected).abs().max() <= 1e-5


def test_wrong_inputs_are_refused_before_running(digits_package):
    loaded = ditfx.load(digits_package)
    good = {"hidden_states": torch.randn(20, 1, 16, 16), "timestep": torch.ones(20),
            "class_labels": torch.arange(20) % 11, "return_dict": False}
    with pytest.raises(ValueError, match="argument hidden_states.*exported for torch.float32 \\(20, 1, 16, 16\\)"):
        loaded(**{**good, "hidden_states": torch.randn(20, 1, 8, 8)})
    with pytest.raises(ValueError, match="argument hidden_states: got a torch.float64"):
        loaded(**{**good, "hidden_states": good["hidden_states"].double()})
    with pytest.raises(ValueError, match="class_labels has 4 rows, other inputs 20"):
        loaded(**{**good, "class_labels": torch.arange(4)})
    with pytest.raises(TypeError, match="argument cross_attention_kwargs was None when this package was exported"):
        loaded(**good, cross_attention_kwargs={"scale": 0.5})
    with pytest.raises(TypeError, match="unexpected argument 'prompt'"):
        loaded(**good, prompt="a seven")
    with pytest.raises(TypeError, match="argument class_labels is missing"):
        loaded(hidden_states=good["hidden_states"], timestep=good["timestep"])
    with pytest.raises(TypeError, match="argument timestep is a ndarray, not a torch.Tensor; .*torch.from_numpy"):
        loaded(**{**good, "timestep": good["timestep"].numpy()})
    with pytest.raises(TypeError, match="argument timestep is a float, not a torch.Tensor; .*torch.tensor\\(value"):
        loaded(**{**good, "timestep": 500.0})
    with pytest.raises(ValueError, match="argument (hidden_states|timestep|class_labels) has 0 rows \\(shape"):
        loaded(**{k: v[:0] if isinstance(v, torch.Tensor) else v for k, v in good.items()})
    assert ditfx.stats(loaded).calls == 0


def test_non_contiguous_inputs_give_the_contiguous_result(digits_package):
    """AOTInductor bakes strides into its code and checks none: a strided input must not read wrong memory."""
    loaded = ditfx.load(digits_package)
    x = torch.randn(20, 1, 16, 16)
    strided = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous() and torch.equal(strided, x)
    kw = {"timestep": torch.full((20,), 900.0), "class_labels": torch.arange(20) % 11, "return_dict": False}
    with ditfx.generation(loaded):
        a = loaded(hidden_states=x, **kw)[0]
    with ditfx.generation(loaded):
        b = loaded(hidden_states=strided, **kw)[0]
    assert torch.equal(a, b)


def _rewrite(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_tampered_or_foreign_packages_are_refused(digits_package, tmp_path):
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(digits_package, copy)
    ditfx.load(copy)  # the copy is intact
    with pytest.raises(PackageError, match="was built for cpu .*asked to load on meta"):
        ditfx.load(copy, device="meta")
    _rewrite(copy / "manifest.json", lambda m: m.update(torch="2.11.0+cu126"))
    with pytest.raises(PackageError, match=re.escape(f"built with torch 2.11.0+cu126, this process has torch "
                                                     f"{torch.__version__}")):
        ditfx.load(copy)
    _rewrite(copy / "manifest.json", lambda m: m.update(torch=torch.__version__, arch="x86_64-AVX512_VNNI_NEW"))
    with pytest.raises(PackageError, match="export the package on this machine"):
        ditfx.load(copy)
    shutil.copy(digits_package / "manifest.json", copy / "manifest.json")
    plan = copy / "plan" / "plan.json"
    plan.write_text(plan.read_text().replace('"delta": 0.5', '"delta": 0.9'))
    with pytest.raises(PackageError, match="plan.json does not match the manifest"):
        ditfx.load(copy)
    (copy / "manifest.json").write_text("{}")
    with pytest.raises(PackageError, match="lacks"):
        ditfx.load(copy)
    with pytest.raises(PackageError, match="not a ditfx package"):
        ditfx.load(tmp_path)


def test_export_refuses_bad_arguments_before_work(digits_package, tmp_path):
    model, kw = tiny_model("reference")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        ditfx.export(model, digits_package, example_inputs=kw)
    with pytest.raises(ValueError, match="example_inputs must be one call's arguments"):
        ditfx.export(model, tmp_path / "p", example_inputs=3)
    with pytest.raises(TypeError, match="config must be a ditfx.Config"):
        ditfx.export(model, tmp_path / "p", example_inputs=kw, config={"cache": None})
    assert not (tmp_path / "p").exists()
