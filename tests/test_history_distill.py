"""ARD distillation: teacher trajectories, the teacher-forced training, the student file and pipeline."""
import warnings

import pytest
import torch

import ditfx
from ditfx.history import HistoryStudent, Trajectories, distill, history_flops, one_shot, record_trajectories
from ditfx.models import digits

pytestmark = pytest.mark.slow  # trains students

warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")


def _run(pipe, index, **call):
    labels = torch.randint(10, (3,), generator=torch.Generator().manual_seed(index)).tolist()
    return pipe(labels, **call)


@pytest.fixture(scope="module")
def pipe():
    p = digits.pipeline()
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def trajectories(pipe):
    return record_trajectories(pipe, _run, generations=3, steps=4, teacher_steps=8, progress=False)


@pytest.fixture(scope="module")
def noisy(pipe):
    return record_trajectories(pipe, _run, generations=3, steps=4, teacher_steps=8, points="noisy", progress=False)


def test_trajectories_are_the_teachers_latents_at_the_students_noise_levels(pipe, noisy):
    t = noisy
    assert t.states.shape == (5, 9, 1, 16, 16) and t.record["teacher_indices"] == [0, 2, 4, 6]
    scheduler = digits.make_scheduler()
    scheduler.set_timesteps(8)
    assert torch.allclose(t.sigmas, scheduler.sigmas[[0, 2, 4, 6, 8]])
    seen = {}

    def keep(p, i, step, kw):
        seen[i + 1] = kw["latents"].clone()
        return kw

    final = _run(pipe, 1, num_inference_steps=8, guidance_scale=1.5, generator=torch.Generator().manual_seed(1),
                 callback_on_step_end=keep).images
    rows = slice(3, 6)  # generation 1
    for s, i in enumerate([2, 4, 6], 1):
        assert torch.equal(t.states[s, rows], seen[i])
    assert torch.equal(t.states[4, rows].clamp(-1, 1), final)
    # the student's own call arguments: its labels, its timesteps (sigma * 1000), no guidance rows
    assert torch.equal(t.calls[0]["class_labels"][rows],
                       torch.randint(10, (3,), generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(t.calls[2]["timestep"][rows], t.sigmas[2] * 1000)
    # a target velocity takes x_s to x_{s+1} in one Euler step
    kwargs, targets = t.batch(torch.tensor([4]))
    x = t.states[:, 4]
    assert torch.allclose(x[:-1] + (t.sigmas[1:] - t.sigmas[:-1]).reshape(-1, 1, 1, 1) * targets, x[1:], atol=1e-6)
    assert kwargs["hidden_states"].shape == (4, 1, 16, 16) and kwargs["class_labels"].shape == (4,)


def test_denoised_points_are_the_teachers_clean_estimates(pipe, noisy, trajectories):
    """points="denoised" (the default): x_i - sigma_i * v_i with v_i the teacher's guided velocity at x_i, computed
    here by calling the teacher; the noise and the final latents are those of points="noisy"."""
    t = trajectories
    assert t.record["points"] == "denoised" and noisy.record["points"] == "noisy"
    assert torch.equal(t.states[0], noisy.states[0]) and torch.equal(t.states[4], noisy.states[4])
    labels = noisy.calls[0]["class_labels"]
    with torch.no_grad():
        for s in (1, 2, 3):
            x, sigma = noisy.states[s], float(noisy.sigmas[s])
            timestep = torch.full((2 * len(x),), sigma * 1000)
            both = pipe.transformer(hidden_states=torch.cat([x, x]), timestep=timestep,
                                    class_labels=torch.cat([torch.full_like(labels, digits.NULL_CLASS), labels]),
                                    return_dict=False)[0]
            uncond, cond = both.chunk(2)
            v = uncond + 1.5 * (cond - uncond)
            assert (t.states[s] - (x - sigma * v)).abs().max() < 1e-4
        assert not torch.allclose(t.states[1], noisy.states[1], atol=1e-2)
    with pytest.raises(ValueError, match="points must be one of"):
        record_trajectories(pipe, _run, 1, points="clean", progress=False)


def test_trajectories_round_trip_through_a_file(trajectories, tmp_path):
    loaded = Trajectories.load(trajectories.save(tmp_path / "t.safetensors"))
    assert torch.equal(loaded.states, trajectories.states) and loaded.record == trajectories.record
    for a, b in zip(loaded.calls, trajectories.calls):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_a_run_that_ignores_its_keywords_is_refused(pipe):
    with pytest.raises(RuntimeError, match="once per step"):
        record_trajectories(pipe, lambda p, i, **call: p([1], num_inference_steps=2), 1, progress=False)
    with pytest.raises(ValueError, match="flow-matching Euler"):
        p = digits.pipeline(scheduler="dpm")
        record_trajectories(p, _run, 1, progress=False)


def test_a_student_starts_as_its_teacher_and_training_lowers_its_loss(pipe, trajectories):
    start = distill(pipe.transformer, trajectories, layers=2, minutes=None, steps=0, held_out=3, progress=False)
    teacher = pipe.transformer.state_dict()
    assert all(torch.equal(v, teacher[k]) for k, v in start.state.items())
    assert torch.equal(start.heads["weight"][3], pipe.transformer.proj_out_2.weight)
    trained = distill(pipe.transformer, trajectories, layers=2, minutes=None, steps=40, batch=6, lr=1e-3,
                      held_out=3, progress=False)
    curve = trained.record["loss_curve"]
    assert sum(curve[-5:]) / 5 < 0.5 * sum(curve[:5]) / 5  # it fits its 6 training trajectories
    assert all(p.requires_grad for p in pipe.transformer.parameters())  # the teacher is untouched
    assert torch.equal(pipe.transformer.state_dict()["proj_out_2.weight"], teacher["proj_out_2.weight"])


def test_a_student_file_round_trips_and_refuses_another_model(pipe, trajectories, tmp_path):
    student = distill(pipe.transformer, trajectories, layers=1, minutes=None, steps=2, held_out=3, progress=False)
    loaded = HistoryStudent.load(student.save(tmp_path / "s.safetensors"))
    assert loaded.layers == 1 and loaded.steps == 4 and loaded.sigmas == pytest.approx(student.sigmas)
    assert torch.equal(loaded.heads["bias"], student.heads["bias"]) and loaded.record["steps"] == 2
    with pytest.raises(ValueError, match="DiTTransformer2DModel"):
        loaded.model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="not a ditfx history student"):
        HistoryStudent.load(trajectories.save(tmp_path / "t.safetensors"))


@pytest.fixture(scope="module")
def student(pipe, trajectories):
    return distill(pipe.transformer, trajectories, layers=2, minutes=None, steps=3, lr=1e-3, held_out=3,
                   progress=False)


def test_the_student_pipeline_equals_the_one_shot_forward_on_its_own_trajectory(student):
    """The cached step-by-step generation (history buffers, step heads, the pipeline's lifecycle) gives per step
    the one-shot masked forward's output on the same inputs: its own trajectory, fed back teacher-forced."""
    fast = digits.pipeline(student=student, compiler="eager")
    fast.set_progress_bar_config(disable=True)
    states = []

    def keep(p, i, t, kw):
        states.append(kw["latents"].clone())
        return kw

    labels = [3, 1, 4]
    noise = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(7))
    fast(labels, generator=torch.Generator().manual_seed(7), callback_on_step_end=keep)
    xs = [noise, *states[:-1]]
    sigmas = torch.tensor([*student.sigmas, 0.0])
    oneshot = one_shot(student.model(digits.load_transformer()), 4, 2, student.heads)
    with torch.no_grad():
        out = oneshot(hidden_states=torch.cat(xs), timestep=(sigmas[:-1] * 1000).repeat_interleave(3),
                      class_labels=torch.tensor(labels).repeat(4), return_dict=False)[0]
    for s in range(4):
        stepped = xs[s] + (sigmas[s + 1] - sigmas[s]) * out[3 * s: 3 * s + 3]
        assert (stepped - states[s]).abs().max() <= 1e-5
    stats = ditfx.stats(fast)
    assert stats.graph_breaks == 0 and stats.recompiles == 0 and stats.steps == 4


def test_the_history_counts_its_papers_flops_in_stats(student):
    counts = {}
    for layers in (0, 2):
        s = HistoryStudent(student.state, layers, 4, student.sigmas, student.heads, model_class=student.model_class)
        p = digits.pipeline(student=s, compiler="eager")
        p.set_progress_bar_config(disable=True)
        p([1, 2], generator=torch.Generator().manual_seed(0))
        counts[layers] = ditfx.stats(p).flops
    extra = history_flops(steps=4, tokens=64, width=128, depth=6, history_layers=2).extra
    assert counts[2] - counts[0] == 2 * extra


def test_the_student_pipeline_refuses_guidance_and_other_step_counts(student):
    p = digits.pipeline(student=student, compiler="eager")
    with pytest.raises(ValueError, match="guidance_scale must be 1.0"):
        p([1], guidance_scale=1.5)
    with pytest.raises(ValueError, match="distilled for 4 steps"):
        p([1], num_inference_steps=8)
    with pytest.raises(ValueError, match="Euler"):
        digits.pipeline(scheduler="dpm", student=student)


@pytest.mark.parametrize("name, layers", [("ard", 2), ("step", 0)])
def test_the_shipped_students_sample_digits_in_four_steps_without_guidance(name, layers):
    student = digits.load_student(name)
    assert student.layers == layers and student.steps == 4 and student.heads["weight"].shape[0] == 4
    assert student.record["teacher"]["guidance_scale"] == 1.5 and student.record["teacher"]["teacher_steps"] == 50
    assert student.record["held_out_loss"] < 0.2 * student.record["held_out_loss_teacher_init"]
    pipe = digits.pipeline(student=name, compiler="eager")
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(10).repeat(2)
    images = pipe(labels, generator=torch.Generator().manual_seed(0)).images
    assert digits.metrics(images, labels)["accuracy"] >= 0.9
    stats = ditfx.stats(pipe)
    assert stats.calls == 4 and stats.nfe == 4


def test_an_unknown_student_is_named():
    with pytest.raises(ValueError, match="student must be one of"):
        digits.load_student("lcm")


def test_the_students_command_records_the_shared_trajectories_alone(tmp_path, capsys):
    from ditfx.models.digits import students

    path = tmp_path / "t.safetensors"
    students.main(["--trajectories", str(path), "--generations", "1", "--points", "noisy"])
    recorded = Trajectories.load(path)
    assert len(recorded) == students.GENERATION_BATCH and recorded.record["points"] == "noisy"
    assert "wrote" in capsys.readouterr().out and not list(tmp_path.glob("student_*"))
    with pytest.raises(SystemExit):  # neither a student to distil nor a file to record
        students.main([])
