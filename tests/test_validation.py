"""Bad input fails at construction or load with an error naming the class and field (and the file), before any
work: config dataclasses, torch.compile options, model checks, cache schedules, LinearAG coefficients; Stats
is a read-only mapping."""
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import ditfx
from conftest import tiny_model
from ditfx.cache.schedule import FORMAT, CacheSchedule, block_fingerprint
from ditfx.config import GuidanceRecording
from ditfx.guidance import linear_ag
from ditfx.guidance.linear_ag import LinearAGCoefficients
from ditfx.validation import WrongType

WEIGHTS = Path(ditfx.__file__).parent / "models" / "digits" / "weights"
NAN, INF = float("nan"), float("inf")


def schedule(n: int = 4, steps: int = 3, **kw) -> CacheSchedule:
    args = dict(blocks=[f"transformer_blocks.{i}" for i in range(n)], times=[1 - k / steps for k in range(steps)],
                change=[[0.0] + [0.1] * (steps - 1) for _ in range(n)])
    args.update(kw)
    return CacheSchedule(**args)


class Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        return x + self.proj(self.norm(x))


class Toy(nn.Module):
    """transformer_blocks.0 .. n-1 of one width: the block paths do not depend on the width."""

    def __init__(self, width: int = 8, n: int = 4):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(Block(width) for _ in range(n))

    def forward(self, x):
        for b in self.transformer_blocks:
            x = b(x)
        return x


# ------------------------------------------------------------------------------------------- 1. configs


def _static(**kw):
    return ditfx.StaticCache(**{"delta": 0.1, "schedule": schedule(), **kw})


@pytest.mark.parametrize("make, error, match", [
    (lambda: ditfx.DynamicCache(threshold="0.1"), TypeError, r"DynamicCache\.threshold must be a number.*"
                                                             r"pass the number 0\.1, not the string"),
    (lambda: ditfx.DynamicCache(threshold=NAN), ValueError, r"DynamicCache\.threshold must be a finite number"),
    (lambda: ditfx.DynamicCache(threshold=INF), ValueError, r"DynamicCache\.threshold must be a finite number"),
    (lambda: ditfx.DynamicCache(threshold=True), TypeError, r"DynamicCache\.threshold must be a number"),
    (lambda: ditfx.DynamicCache(threshold=None), TypeError, r"DynamicCache\.threshold must be a number"),
    (lambda: ditfx.DynamicCache(threshold=-0.1), ValueError, r"threshold must be >= 0"),
    (lambda: ditfx.DynamicCache(threshold=0.1, per_sample="no"), TypeError,
     r"DynamicCache\.per_sample must be True or False, got 'no'"),
    (lambda: ditfx.DynamicCache(threshold=0.1, per_sample=1), TypeError, r"DynamicCache\.per_sample"),
    (lambda: ditfx.DynamicCache(threshold=0.1, first=1.5), TypeError,
     r"DynamicCache\.first must be an int, got 1\.5 \(float\): pass a whole number"),
    (lambda: ditfx.DynamicCache(threshold=0.1, first=2.0), TypeError, r"DynamicCache\.first must be an int"),
    (lambda: ditfx.DynamicCache(threshold=0.1, first=True), TypeError, r"DynamicCache\.first must be an int, got True"),
    (lambda: ditfx.DynamicCache(threshold=0.1, first=0), ValueError, r"first must be >= 1"),
    (lambda: ditfx.DynamicCache(threshold=0.1, last=-1), ValueError, r"DynamicCache\.last must be >= 0"),
    (lambda: ditfx.DynamicCache(threshold=0.1, last="1"), TypeError, r"DynamicCache\.last must be an int"),
    (lambda: ditfx.DynamicCache(threshold=0.1, warmup=-1), ValueError, r"DynamicCache\.warmup must be >= 0"),
    (lambda: ditfx.DynamicCache(threshold=0.1, warmup=1.0), TypeError, r"DynamicCache\.warmup must be an int"),
    (lambda: ditfx.DynamicCache(threshold=0.1, max_reuse=2.0), TypeError,
     r"DynamicCache\.max_reuse must be an int or None"),
    (lambda: ditfx.DynamicCache(threshold=0.1, max_reuse=0), ValueError, r"max_reuse must be >= 1"),
    (lambda: ditfx.DynamicCache(threshold=0.1, mode="both"), ValueError, r"DynamicCache\.mode: cache mode"),
    (lambda: ditfx.DynamicCache(threshold=0.1, mode=None), ValueError, r"cache mode"),
    (lambda: ditfx.DynamicCache(threshold=0.1, forecast="quadratic"), ValueError,
     r"DynamicCache\.forecast: cache forecast must be 'none'"),
    (lambda: _static(delta="0.1"), TypeError, r"StaticCache\.delta must be a number"),
    (lambda: _static(delta=NAN), ValueError, r"StaticCache\.delta must be a finite number"),
    (lambda: _static(delta=-1), ValueError, r"StaticCache\.delta must be >= 0"),
    (lambda: _static(per_block="yes"), TypeError, r"StaticCache\.per_block must be True or False"),
    (lambda: _static(mode="both"), ValueError, r"StaticCache\.mode: cache mode"),
    (lambda: _static(mode="output"), ValueError, r"differs from the schedule's calibration mode"),
    (lambda: _static(forecast=1), ValueError, r"StaticCache\.forecast: cache forecast"),
    (lambda: _static(schedule=5), TypeError, r"StaticCache\.schedule must be a CacheSchedule or the path"),
    (lambda: _static(schedule={"blocks": []}), TypeError, r"StaticCache\.schedule must be a CacheSchedule"),
    (lambda: ditfx.CacheCalibration(mode="out"), ValueError, r"CacheCalibration\.mode: cache mode"),
    (lambda: ditfx.AdaptiveGuidance(gamma="0.9"), TypeError, r"AdaptiveGuidance\.gamma must be a number"),
    (lambda: ditfx.AdaptiveGuidance(gamma=NAN), ValueError, r"AdaptiveGuidance\.gamma must be a finite number"),
    (lambda: ditfx.AdaptiveGuidance(gamma=1.5), ValueError, r"AdaptiveGuidance\.gamma is a cosine in \[-1, 1\]"),
    (lambda: ditfx.AdaptiveGuidance(per_sample=1), TypeError, r"AdaptiveGuidance\.per_sample must be True or False"),
    (lambda: ditfx.AdaptiveGuidance(uncond_first="yes"), TypeError,
     r"AdaptiveGuidance\.uncond_first must be True or False or None"),
    (lambda: ditfx.AdaptiveGuidance(uncond_first=0), TypeError, r"AdaptiveGuidance\.uncond_first"),
    (lambda: ditfx.AdaptiveGuidance(warmup=INF), ValueError, r"AdaptiveGuidance\.warmup must be a finite number"),
    (lambda: ditfx.AdaptiveGuidance(warmup=1.0), ValueError, r"AdaptiveGuidance\.warmup is a fraction"),
    (lambda: ditfx.AdaptiveGuidance(warmup="0"), TypeError, r"AdaptiveGuidance\.warmup must be a number"),
    (lambda: ditfx.AdaptiveGuidance(fill="zero"), ValueError, r"AdaptiveGuidance\.fill must be 'cond'"),
    (lambda: ditfx.GuidanceWindow(start=NAN), ValueError, r"GuidanceWindow\.start must be a finite number"),
    (lambda: ditfx.GuidanceWindow(stop="1"), TypeError, r"GuidanceWindow\.stop must be a number"),
    (lambda: ditfx.GuidanceWindow(start=0.6, stop=0.2), ValueError, r"start <= stop"),
    (lambda: ditfx.GuidanceWindow(stop=1.5), ValueError, r"0 <= start <= stop <= 1"),
    (lambda: ditfx.GuidanceWindow(uncond_first="no"), TypeError, r"GuidanceWindow\.uncond_first"),
    (lambda: ditfx.LinearAG(5), TypeError, r"LinearAG\.coefficients must be LinearAGCoefficients"),
    (lambda: ditfx.LinearAG("/nonexistent/c.json"), FileNotFoundError, r"not found.*ditfx calibrate-guidance"),
    (lambda: ditfx.LinearAG(WEIGHTS / "linear_ag.json", uncond_first=1), TypeError, r"LinearAG\.uncond_first"),
    (lambda: GuidanceRecording(uncond_first="first"), TypeError, r"GuidanceRecording\.uncond_first"),
    (lambda: ditfx.Config(kernels="yes"), TypeError, r"Config\.kernels must be True or False.*got 'yes'"),
    (lambda: ditfx.Config(kernels=1), TypeError, r"Config\.kernels"),
    (lambda: ditfx.Config(compiler="tvm"), ValueError, r"unknown inner backend 'tvm'"),
    (lambda: ditfx.Config(compiler=None), ValueError, r"unknown inner backend None"),
    (lambda: ditfx.Config(compile_regions="some"), ValueError, r"Config\.compile_regions must be one of"),
    (lambda: ditfx.Config(cache="fast"), TypeError, r"Config\.cache must be .*ditfx\.DynamicCache\(threshold=0\.1\)"),
    (lambda: ditfx.Config(cache={"kind": "dynamic", "threshold": 0.1}), TypeError, r"Config\.cache must be"),
    (lambda: ditfx.Config(guidance="adaptive"), TypeError, r"Config\.guidance must be"),
])
def test_bad_field_is_a_clear_error(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_wrong_types_are_type_errors_and_value_errors():
    """Callers that report configuration errors by catching ValueError (the CLI) report wrong types too."""
    with pytest.raises(TypeError) as info:
        ditfx.DynamicCache(threshold="0.1")
    assert isinstance(info.value, ValueError) and isinstance(info.value, WrongType)


def test_good_values_are_accepted_and_normalised():
    cache = ditfx.DynamicCache(threshold=0, first=np.int64(2), last=1, warmup=0, max_reuse=3, per_sample=False)
    assert cache.threshold == 0.0 and type(cache.threshold) is float
    assert cache.first == 2 and type(cache.first) is int
    assert ditfx.DynamicCache(threshold=np.float32(0.25)).threshold == 0.25
    assert ditfx.StaticCache(delta=1, schedule=schedule()).delta == 1.0
    assert ditfx.AdaptiveGuidance(gamma=-1, warmup=0).gamma == -1.0
    assert ditfx.GuidanceWindow(start=0, stop=1) == ditfx.GuidanceWindow(0.0, 1.0)
    # equal configs stay equal (and hash alike) after normalisation
    assert hash(ditfx.DynamicCache(threshold=1)) == hash(ditfx.DynamicCache(threshold=1.0))


@pytest.mark.parametrize("cls, args", [
    (ditfx.AdaptiveGuidance, {}), (ditfx.GuidanceWindow, {}), (GuidanceRecording, {}),
    (ditfx.LinearAG, {"coefficients": WEIGHTS / "linear_ag.json"}),
])
def test_uncond_first_defaults_to_none_and_takes_a_bool(cls, args):
    assert cls(**args).uncond_first is None
    assert cls(**args, uncond_first=True).uncond_first is True
    assert cls(**args, uncond_first=False).uncond_first is False
    assert "None" in cls.__doc__ and "cache_context" in cls.__doc__


@pytest.mark.parametrize("options, error, match", [
    ({"cache": {"kind": "fast", "threshold": 0.1}}, ValueError,
     r"cache kind must be 'dynamic' or 'static', got 'fast'"),
    ({"cache": {"kind": None}}, ValueError, r"cache kind must be 'dynamic' or 'static', got None"),
    ({"cache": {"kind": ["dynamic"]}}, ValueError, r"cache kind must be"),
    ({"cache": {"kind": "dynamic", "treshold": 0.1}}, ValueError,
     r"options\['cache'\] of kind 'dynamic' \(DynamicCache\) has unknown key\(s\) \['treshold'\]"),
    ({"cache": {"kind": "static", "delta": 0.1}}, ValueError, r"StaticCache needs schedule="),
    ({"cache": {"threshold": "high"}}, TypeError, r"DynamicCache\.threshold must be a number"),
    ({"cache": "dynamic"}, TypeError, r"Config\.cache must be"),
    ({"guidance": {"kind": "cfg"}}, ValueError, r"guidance kind must be one of 'adaptive', 'window', 'linear'"),
    ({"guidance": {"gamma": 2}}, ValueError, r"cosine in"),
    ({"guidance": {"kind": "window", "begin": 0.1}}, ValueError, r"unknown key\(s\) \['begin'\]"),
    ({"threshold": 0.1}, ValueError, r"unknown ditfx option"),
    ({"kernels": "yes"}, TypeError, r"Config\.kernels"),
    ({"config": ditfx.Config(), "compiler": "eager"}, ValueError, r"either 'config' or fields"),
])
def test_bad_options_are_clear_errors(options, error, match):
    with pytest.raises(error, match=match):
        ditfx.Config.from_options(options)


def test_options_must_be_a_dict():
    with pytest.raises(TypeError, match="ditfx options must be a dict, got list"):
        ditfx.Config.from_options([("compiler", "eager")])


def test_good_options():
    assert ditfx.Config.from_options(None) == ditfx.Config()
    config = ditfx.Config.from_options({"compiler": "eager", "cache": {"threshold": 0.1, "first": 2}})
    assert config.cache == ditfx.DynamicCache(0.1, first=2)
    config = ditfx.Config.from_options({"cache": {"kind": "static", "delta": 0.1,
                                                  "schedule": str(WEIGHTS / "cache_schedule.json")}})
    assert isinstance(config.cache, ditfx.StaticCache)
    options = {"guidance": {"kind": "window", "start": 0.0, "stop": 0.5}}
    assert ditfx.Config.from_options(options).guidance == ditfx.GuidanceWindow(0.0, 0.5)
    assert options == {"guidance": {"kind": "window", "start": 0.0, "stop": 0.5}}  # the caller's dict is kept


# ------------------------------------------------------------------------------------ 2. model checks


def test_no_middle_blocks_fails_in_check_model():
    model, _ = tiny_model("reference")
    n = len(ditfx.repeated_blocks(model))
    first = n // 2
    config = ditfx.Config(cache=ditfx.DynamicCache(0.1, first=first, last=n - first))
    message = (f"DynamicCache(first={first}, last={n - first}) leaves no middle blocks to skip in a model with "
               f"{n} blocks: use first + last < {n}")
    with pytest.raises(ValueError, match=re.escape(message)):
        config.check_model(model)
    ditfx.Config(cache=ditfx.DynamicCache(0.1, first=first, last=n - first - 1)).check_model(model)


def test_no_middle_blocks_message_on_a_four_block_model():
    with pytest.raises(ValueError, match=re.escape("DynamicCache(first=2, last=2) leaves no middle blocks to skip "
                                                   "in a model with 4 blocks: use first + last < 4")):
        ditfx.Config(cache=ditfx.DynamicCache(0.1, first=2, last=2)).check_model(Toy(n=4))


def test_check_model_passes_what_it_cannot_judge():
    ditfx.Config().check_model(Toy())
    ditfx.Config(cache=ditfx.CacheCalibration()).check_model(Toy())
    ditfx.Config(guidance=ditfx.AdaptiveGuidance()).check_model(Toy())
    # no repeated blocks: ditfx falls back to the inner compiler with a warning, not an error here
    ditfx.Config(cache=ditfx.DynamicCache(0.1, first=3)).check_model(nn.Sequential(nn.Linear(2, 2)))


def test_check_model_argument_types():
    with pytest.raises(TypeError, match="nn.Module"):
        ditfx.Config().check_model(object())


def test_static_cache_for_other_block_paths_fails_in_check_model():
    config = ditfx.Config(cache=ditfx.StaticCache(0.1, schedule(n=6)))
    with pytest.raises(ValueError, match="calibrated for a model with 6 blocks.*run 'ditfx calibrate'"):
        config.check_model(Toy(n=4))


def test_schedule_fingerprint_rejects_other_widths():
    calibrated = Toy(width=8)
    paths = ditfx.repeated_blocks(calibrated)
    sched = schedule(n=4, fingerprint=block_fingerprint(calibrated, paths))
    config = ditfx.Config(cache=ditfx.StaticCache(0.1, sched))
    config.check_model(calibrated)
    config.check_model(Toy(width=8).to(torch.float16))  # same shapes, other dtype: the same model
    wider = Toy(width=16)
    assert ditfx.repeated_blocks(wider) == paths
    with pytest.raises(ValueError, match=r"calibrated for a model whose blocks have other weights' shapes: "
                                         r"4 of 4 blocks differ.*run 'ditfx calibrate' on this model"):
        config.check_model(wider)
    with pytest.raises(ValueError, match="other weights' shapes"):
        sched.check_model(paths, wider)
    sched.check_model(paths)  # without the module: the paths only, as before
    # a schedule without a fingerprint (written before) is checked by paths only
    ditfx.Config(cache=ditfx.StaticCache(0.1, schedule(n=4))).check_model(wider)


def test_block_fingerprint():
    model = Toy(width=8)
    fp = block_fingerprint(model, ["transformer_blocks.0", "transformer_blocks.1"])
    assert list(fp) == ["transformer_blocks.0", "transformer_blocks.1"]
    assert fp["transformer_blocks.0"] == fp["transformer_blocks.1"]
    count = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    assert fp["transformer_blocks.0"].startswith(f"{count}:")
    assert block_fingerprint(Toy(width=8, n=2), ["transformer_blocks.0"])["transformer_blocks.0"] == \
        fp["transformer_blocks.0"]
    other = block_fingerprint(Toy(width=9), ["transformer_blocks.0"])
    assert other["transformer_blocks.0"] != fp["transformer_blocks.0"]
    with pytest.raises(ValueError, match="no submodule 'blocks.0'"):
        block_fingerprint(model, ["blocks.0"])


# ------------------------------------------------------------------------------------- 3. schedules


@pytest.mark.parametrize("kw, error, match", [
    ({"change": [[0.0, NAN, 0.1]] * 4}, ValueError, r"CacheSchedule\.change\[0\]\[1\] must be a finite number"),
    ({"change": [[0.0, 0.1, INF]] * 4}, ValueError, r"CacheSchedule\.change\[0\]\[2\] must be a finite number"),
    ({"change": [[0.0, -0.1, 0.1]] * 4}, ValueError, r"CacheSchedule\.change\[0\]\[1\] must be >= 0"),
    ({"change": [[0.0, "0.1", 0.1]] * 4}, TypeError, r"CacheSchedule\.change\[0\]\[1\] must be a number"),
    ({"change": "0.1"}, TypeError, r"CacheSchedule\.change must be a list of change curves"),
    ({"change": [[0.0, 0.1, 0.1]] * 3}, ValueError, r"3 change curves for 4 blocks"),
    ({"change": [[0.0, 0.1]] * 4}, ValueError, r"CacheSchedule\.change\[0\] has 2 values for 3 calibration steps"),
    ({"change": [0.1] * 4}, TypeError, r"CacheSchedule\.change\[0\] must be a list of numbers"),
    ({"times": [1.0, NAN, 0.3]}, ValueError, r"CacheSchedule\.times\[1\] must be a finite number"),
    ({"times": [1.0, 0.5, 0.5]}, ValueError, r"CacheSchedule\.times must be strictly decreasing.*times\[2\] = 0\.5"),
    ({"times": [0.0, 0.5, 1.0]}, ValueError, r"CacheSchedule\.times must be strictly decreasing"),
    ({"times": "1.0, 0.5, 0.0"}, TypeError, r"CacheSchedule\.times must be a list of numbers, got str"),
    ({"times": [1.0], "change": [[0.0]] * 4}, ValueError, r"at least two calibration steps"),
    ({"time_scale": 0}, ValueError, r"CacheSchedule\.time_scale must be > 0"),
    ({"time_scale": -1000.0}, ValueError, r"CacheSchedule\.time_scale must be > 0"),
    ({"time_scale": INF}, ValueError, r"CacheSchedule\.time_scale must be a finite number"),
    ({"time_scale": "1000"}, TypeError, r"CacheSchedule\.time_scale must be a number"),
    ({"generations": 0}, ValueError, r"CacheSchedule\.generations must be >= 1"),
    ({"generations": 2.0}, TypeError, r"CacheSchedule\.generations must be an int"),
    ({"mode": "both"}, ValueError, r"CacheSchedule\.mode must be one of 'residual', 'output', got 'both'"),
    ({"blocks": "transformer_blocks"}, TypeError, r"CacheSchedule\.blocks must be a list of block module paths"),
    ({"blocks": [0, 1, 2, 3]}, TypeError, r"CacheSchedule\.blocks\[0\] must be a block module path"),
    ({"blocks": ["a", "b", "a", "c"]}, ValueError, r"names a block more than once: \['a'\]"),
    ({"blocks": [], "change": []}, ValueError, r"CacheSchedule\.blocks is empty"),
    ({"meta": []}, TypeError, r"CacheSchedule\.meta must be a dict"),
    ({"fingerprint": "abc"}, TypeError, r"CacheSchedule\.fingerprint must be None or a dict"),
    ({"fingerprint": {"transformer_blocks.0": 1}}, TypeError, r"CacheSchedule\.fingerprint maps block paths"),
    ({"fingerprint": {"blocks.9": "1:ab"}}, ValueError, r"fingerprint names blocks the schedule does not have"),
])
def test_bad_schedule_fails_at_construction(kw, error, match):
    with pytest.raises(error, match=match):
        schedule(**kw)


def test_schedule_normalises_sequences():
    s = schedule(times=(1, 0.5, 0), change=[np.array([0.0, 0.1, 0.2]).tolist()] * 4)
    assert s.times == [1.0, 0.5, 0.0] and all(type(t) is float for t in s.times)
    assert s.change[0] is not s.change[1]  # one list per block, not the caller's shared list


def test_shipped_schedule_loads():
    s = CacheSchedule.load(WEIGHTS / "cache_schedule.json")
    assert s.steps == 50 and len(s.blocks) == 6
    from ditfx.models.digits import load_transformer

    assert s.fingerprint == block_fingerprint(load_transformer(), s.blocks)  # it names the shipped model's blocks
    assert ditfx.StaticCache(0.1, WEIGHTS / "cache_schedule.json").schedule.blocks == s.blocks


def test_schedule_round_trip_with_and_without_fingerprint(tmp_path):
    model = Toy()
    s = schedule(fingerprint=block_fingerprint(model, ditfx.repeated_blocks(model)), meta={"model": "Toy"})
    assert CacheSchedule.load(s.save(tmp_path / "a.json")) == s
    old = schedule()
    data = {"format": FORMAT, **dataclasses.asdict(old)}
    del data["fingerprint"]  # a file written before fingerprints existed
    (tmp_path / "old.json").write_text(json.dumps(data))
    assert CacheSchedule.load(tmp_path / "old.json") == old


def _write(tmp_path, data, name="s.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _schedule_data(**kw) -> dict:
    return {"format": FORMAT, **dataclasses.asdict(schedule()), **kw}


@pytest.mark.parametrize("content, error, match", [
    ('{"format": "ditfx.cache_schedule/1",\n "blocks": [', ValueError,
     r"s\.json is not valid JSON \(line 2, column .*damaged or truncated: write the schedule again "
     r"with 'ditfx calibrate'"),
    ("", ValueError, r"s\.json is not valid JSON \(line 1, column 1"),
    ([1, 2], ValueError, r"s\.json is not a cache schedule: expected a JSON object.*got a JSON array"),
    ({"blocks": []}, ValueError, r"s\.json is not a cache schedule \(its \"format\" is None"),
    (_schedule_data(format="ditfx.linear_ag/1"), ValueError, r"not a cache schedule .*'ditfx\.linear_ag/1'"),
    (_schedule_data(format="ditfx.cache_schedule/2"), ValueError, r"in format 'ditfx\.cache_schedule/2', which this "
                                                                  r"ditfx does not read"),
    (_schedule_data(times=[1.0, NAN, 0.0]), ValueError,
     r"s\.json: CacheSchedule\.times\[1\] must be a finite number, got nan; write the schedule again"),
    (_schedule_data(times=[0.0, 0.5, 1.0]), ValueError, r"s\.json: CacheSchedule\.times must be strictly decreasing"),
    (_schedule_data(change=[[0.0, -1.0, 0.0]] * 4), ValueError,
     r"s\.json: CacheSchedule\.change\[0\]\[1\] must be >= 0"),
    (_schedule_data(time_scale=0), ValueError, r"s\.json: CacheSchedule\.time_scale must be > 0"),
    (_schedule_data(generations=0), ValueError, r"s\.json: CacheSchedule\.generations must be >= 1"),
    (_schedule_data(mode="both"), ValueError, r"s\.json: CacheSchedule\.mode must be one of"),
    (_schedule_data(times="1 0.5 0"), TypeError, r"s\.json: CacheSchedule\.times must be a list of numbers, got str"),
    (_schedule_data(blocks={"a": 1}), TypeError, r"s\.json: CacheSchedule\.blocks must be a list"),
    (_schedule_data(extra=1), ValueError, r"s\.json: unknown field\(s\) \['extra'\] in a cache schedule; known: "),
    ({k: v for k, v in _schedule_data().items() if k != "times"}, ValueError,
     r"s\.json: the cache schedule has no \['times'\] field\(s\) \(required: \['blocks', 'times', 'change'\]\)"),
])
def test_bad_schedule_file_names_the_file_and_field(tmp_path, content, error, match):
    path = _write(tmp_path, content)
    with pytest.raises(error, match=match):
        CacheSchedule.load(path)
    with pytest.raises(error, match=match):  # through the config, at construction
        ditfx.StaticCache(0.1, str(path))


def test_schedule_file_that_is_missing_binary_or_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError,
                       match="cache schedule .*nope.json not found: write one with 'ditfx calibrate'"):
        CacheSchedule.load(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="is a directory, not a cache schedule file: pass the path of the JSON"):
        CacheSchedule.load(tmp_path)
    (tmp_path / "b.json").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match=r"b\.json is not a cache schedule \(not UTF-8 text"):
        CacheSchedule.load(tmp_path / "b.json")


def test_json_errors_are_value_errors_not_decode_errors(tmp_path):
    path = _write(tmp_path, "{oops")
    with pytest.raises(ValueError) as info:
        CacheSchedule.load(path)
    assert not isinstance(info.value, json.JSONDecodeError)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------------- LinearAG coefficients


def coefficients(steps: int = 6, window: int = 2, **kw) -> LinearAGCoefficients:
    betas = [[0.5] * (linear_ag.feature_count(k, window) + 1) if linear_ag.step_kind(k, steps) == "estimate" else None
             for k in range(steps)]
    args = dict(times=[1 - k / steps for k in range(steps)], betas=betas,
                fit_error=[0.01 if b is not None else None for b in betas], window=window)
    args.update(kw)
    return LinearAGCoefficients(**args)


@pytest.mark.parametrize("kw, error, match", [
    ({"times": [1.0, 0.8, 0.8, 0.4, 0.2, 0.0]}, ValueError, r"LinearAGCoefficients\.times must be strictly decreasing"),
    ({"times": [1.0, 0.8, INF, 0.4, 0.2, 0.0]}, ValueError, r"LinearAGCoefficients\.times\[2\] must be a finite"),
    ({"times": "1.0"}, TypeError, r"LinearAGCoefficients\.times must be a list of numbers"),
    ({"times": [], "betas": [], "fit_error": []}, ValueError, r"LinearAGCoefficients\.times is empty"),
    ({"times": [1.0, 0.5]}, ValueError, r"LinearAGCoefficients\.betas has 6 entries for 2 steps"),
    ({"fit_error": [None] * 5}, ValueError, r"LinearAGCoefficients\.fit_error has 5 entries for 6 steps"),
    ({"fit_error": [None, NAN, None, 0.1, None, None]}, ValueError, r"fit_error\[1\] must be a finite number"),
    ({"fit_error": [None, -0.1, None, 0.1, None, None]}, ValueError, r"fit_error\[1\] must be >= 0"),
    ({"fit_error": "small"}, TypeError, r"LinearAGCoefficients\.fit_error must be a list"),
    ({"betas": [None, [0.5] * 3, None, [0.5] * 6, None, None]}, ValueError,
     r"LinearAGCoefficients\.betas\[1\] has 3 coefficients; step 1 with window 2 needs 4 \(3 features, then the "
     r"intercept\)"),
    ({"betas": [None, [0.5, NAN, 0.5, 0.5], None, [0.5] * 6, None, None]}, ValueError,
     r"LinearAGCoefficients\.betas\[1\]\[1\] must be a finite number"),
    ({"betas": [None, "0.5", None, [0.5] * 6, None, None]}, TypeError,
     r"LinearAGCoefficients\.betas\[1\] must be a list"),
    ({"betas": [None, None, None, [0.5] * 6, None, None]}, ValueError,
     r"LinearAGCoefficients\.betas\[1\] is None, but step 1 of 6 is an estimated step"),
    ({"betas": {"1": [0.5]}}, TypeError, r"LinearAGCoefficients\.betas must be a list"),
    ({"window": -1}, ValueError, r"LinearAGCoefficients\.window must be >= 0"),
    ({"window": 2.0}, TypeError, r"LinearAGCoefficients\.window must be an int"),
    ({"meta": None}, TypeError, r"LinearAGCoefficients\.meta must be a dict"),
])
def test_bad_coefficients_fail_at_construction(kw, error, match):
    with pytest.raises(error, match=match):
        coefficients(**kw)


def test_coefficients_of_other_windows_and_the_shipped_file():
    assert coefficients(steps=8, window=1).betas[3] == [0.5] * 4  # c_3, c_2, u_2, intercept
    assert coefficients(steps=8, window=2).betas[3] == [0.5] * 6
    assert coefficients(window=0).betas[1] == [0.5] * 2
    shipped = LinearAGCoefficients.load(WEIGHTS / "linear_ag.json")
    assert shipped.steps == 50
    assert ditfx.LinearAG(WEIGHTS / "linear_ag.json").coefficients == shipped


def test_fit_produces_valid_coefficients(tmp_path):
    g = torch.Generator().manual_seed(0)
    steps = 6
    cond = [[torch.randn(2, 4, generator=g) for _ in range(steps)] for _ in range(2)]
    uncond = [[torch.randn(2, 4, generator=g) for _ in range(steps)] for _ in range(2)]
    fitted = linear_ag.fit(cond, uncond, [1 - k / steps for k in range(steps)])
    assert LinearAGCoefficients.load(fitted.save(tmp_path / "c.json")) == fitted


def _coefficient_data(**kw) -> dict:
    return {"format": linear_ag.FORMAT, **dataclasses.asdict(coefficients()), **kw}


@pytest.mark.parametrize("content, error, match", [
    ('{"format": "ditfx.linear_ag/1", "times": [1.0,', ValueError,
     r"c\.json is not valid JSON \(line 1, column .*'ditfx calibrate-guidance'"),
    ('"just a string"', ValueError, r"c\.json is not a LinearAG coefficient file: expected a JSON object"),
    (_schedule_data(), ValueError, r"c\.json is not a LinearAG coefficient file \(its \"format\" is "
                                   r"'ditfx\.cache_schedule/1'"),
    (_coefficient_data(times=[1.0, 0.9, 0.9, 0.5, 0.2, 0.0]), ValueError,
     r"c\.json: LinearAGCoefficients\.times must be strictly decreasing.*calibrate-guidance"),
    (_coefficient_data(betas=[None] * 6), ValueError, r"c\.json: LinearAGCoefficients\.betas\[1\] is None"),
    (_coefficient_data(fit_error=[None] * 2), ValueError, r"c\.json: LinearAGCoefficients\.fit_error has 2 entries"),
    (_coefficient_data(window="2"), TypeError, r"c\.json: LinearAGCoefficients\.window must be an int"),
    (_coefficient_data(beta=[]), ValueError, r"c\.json: unknown field\(s\) \['beta'\] in a LinearAG coefficient file"),
    ({"format": linear_ag.FORMAT, "times": [1.0]}, ValueError,
     r"c\.json: the LinearAG coefficient file has no \['betas', 'fit_error'\] field\(s\)"),
])
def test_bad_coefficient_file_names_the_file_and_field(tmp_path, content, error, match):
    path = _write(tmp_path, content, "c.json")
    with pytest.raises(error, match=match):
        LinearAGCoefficients.load(path)
    with pytest.raises(error, match=match):
        ditfx.LinearAG(path)


# ------------------------------------------------------------------------------------------- 4. Stats


def test_stats_is_a_read_only_mapping():
    from collections.abc import Mapping

    stats = ditfx.Stats(calls=3, nfe=2.5)
    assert isinstance(stats, Mapping)
    assert "nfe" in stats and "nope" not in stats and 3 not in stats and [] not in stats
    assert stats.get("nfe") == 2.5 and stats.get("x", 0) == 0 and stats.get("x") is None
    assert stats["calls"] == 3 and stats.calls == 3
    names = [f.name for f in dataclasses.fields(ditfx.Stats)]
    assert len(stats) == len(names) and list(stats) == names and list(stats.keys()) == names
    assert list(stats.values()) == [getattr(stats, n) for n in names]
    assert dict(stats.items()) == dict(stats) == stats.to_dict() == dataclasses.asdict(stats)
    assert ditfx.Stats(**dict(stats)) == stats and ditfx.Stats(**stats) == stats
    with pytest.raises(KeyError, match="nope"):
        stats["nope"]
    with pytest.raises(KeyError):
        stats["to_dict"]  # methods are not keys
    assert not hasattr(stats, "__setitem__")
    stats.calls = 4  # attribute access is as before
    assert stats["calls"] == 4
    assert stats != ditfx.Stats() and stats == ditfx.Stats(**stats.to_dict())
    assert math.isclose(sum(v for k, v in stats.items() if k == "nfe"), 2.5)
