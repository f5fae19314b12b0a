"""The embedded digits DiT: shipped weights, pipeline behaviour, and its metrics."""

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from ditfx.models import digits
from ditfx.models.digits.data import held_out_split, train_split
from ditfx.models.digits.metrics import frechet_distance, real_floor_fd
from ditfx.models.digits.shipped import TRAIN_COMMAND, shipped_file


@pytest.fixture(scope="module")
def pipe():
    pipe = digits.pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_pipeline_loads_shipped_weights_and_samples_in_range(pipe):
    images = pipe([0, 5, 9], num_inference_steps=4, generator=seeded()).images
    assert images.shape == (3, 1, 16, 16)
    assert images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0


def test_same_generator_gives_same_images(pipe):
    first = pipe([3, 7], num_inference_steps=4, generator=seeded(1)).images
    second = pipe([3, 7], num_inference_steps=4, generator=seeded(1)).images
    other = pipe([3, 7], num_inference_steps=4, generator=seeded(2)).images
    assert torch.equal(first, second)
    assert not torch.equal(first, other)


def test_output_types(pipe):
    (array,) = pipe([1, 2], num_inference_steps=2, output_type="np", return_dict=False)
    assert isinstance(array, np.ndarray) and array.shape == (2, 1, 16, 16)
    pictures = pipe([1], num_inference_steps=2, output_type="pil").images
    assert (
        isinstance(pictures[0], Image.Image)
        and pictures[0].size == (16, 16)
        and pictures[0].mode == "L"
    )


@pytest.mark.parametrize("guidance_scale, batch_factor", [(1.0, 1), (0.5, 1), (3.0, 2)])
def test_guidance_batches_unconditional_half_first(pipe, guidance_scale, batch_factor):
    calls = []

    def record(module, args, kwargs):
        calls.append(
            (
                kwargs["hidden_states"].shape[0],
                kwargs["class_labels"].clone(),
                kwargs["timestep"].shape,
            )
        )

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe([4, 8, 2], num_inference_steps=3, guidance_scale=guidance_scale, generator=seeded())
    finally:
        handle.remove()
    assert len(calls) == 3
    labels = torch.tensor([4, 8, 2])
    expected = (
        torch.cat([torch.full((3,), digits.NULL_CLASS), labels]) if batch_factor == 2 else labels
    )
    for batch, class_labels, timestep_shape in calls:
        assert batch == 3 * batch_factor
        assert torch.equal(class_labels, expected)
        assert timestep_shape == (3 * batch_factor,)


def test_null_class_is_the_extra_embedding_row():
    table = digits.load_transformer().transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert digits.NULL_CLASS == 10 and table.num_embeddings == 11


def test_dpm_solver_runs():
    pipe = digits.pipeline("dpm")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        list(range(10)), num_inference_steps=10, guidance_scale=3.0, generator=seeded()
    ).images
    assert images.shape == (10, 1, 16, 16) and torch.isfinite(images).all()
    assert digits.metrics(images, list(range(10)))["accuracy"] >= 0.7


def test_short_guided_sampling_draws_the_requested_digits(pipe):
    labels = torch.arange(10).repeat(2)
    images = pipe(labels, num_inference_steps=10, guidance_scale=3.0, generator=seeded()).images
    assert digits.metrics(images, labels)["accuracy"] >= 0.8


def test_metrics_on_real_digits_and_noise():
    held_out = held_out_split()
    real = digits.metrics(held_out.images, held_out.labels)
    assert real["accuracy"] >= 0.97
    assert real["fd"] < 1e-6  # the held-out split is the FD reference itself
    assert real_floor_fd(360) < 60.0  # other real digits, same count
    noise = torch.rand(360, 1, 16, 16, generator=seeded()) * 2 - 1
    assert digits.metrics(noise, held_out.labels)["fd"] > 1000.0


def test_psnr_and_ssim_of_images_against_themselves():
    images = train_split().images[:8]
    result = digits.metrics(images, train_split().labels[:8], reference=images)
    assert result["psnr"] == float("inf")
    assert result["ssim"] == pytest.approx(1.0)
    other = digits.metrics(images, train_split().labels[:8], reference=train_split().images[8:16])
    assert other["psnr"] < 20.0 and other["ssim"] < 0.8


def test_frechet_distance_matches_sqrtm_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 1.0
    mu1, cov1, mu2, cov2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(
        cov1 + cov2 - 2 * scipy.linalg.sqrtm(cov1 @ cov2).real
    )
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "bad_labels, error, message",
    [
        ([11], ValueError, "class labels must be digits"),
        ([-1], ValueError, "class labels must be digits"),
        ([[1, 2]], ValueError, "1-D"),
        ([1.5], TypeError, "integers"),
    ],
)
def test_pipeline_rejects_bad_class_labels(pipe, bad_labels, error, message):
    with pytest.raises(error, match=message):
        pipe(bad_labels, num_inference_steps=1)


def test_metrics_reject_bad_inputs():
    images = held_out_split().images[:4]
    with pytest.raises(ValueError, match=r"shape \(N, 1, 16, 16\)"):
        digits.metrics(images[:, 0], [0, 1, 2, 3])
    with pytest.raises(ValueError, match="shape"):
        digits.metrics(torch.zeros(4, 1, 8, 8), [0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        digits.metrics(images * 2, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="digits 0..9"):
        digits.metrics(images, [0, 1, 2, 10])
    with pytest.raises(ValueError, match="reference"):
        digits.metrics(images, [0, 1, 2, 3], reference=images[:2])


def test_missing_weights_error_names_file_and_command():
    with pytest.raises(FileNotFoundError, match="missing.safetensors") as error:
        shipped_file("missing.safetensors", TRAIN_COMMAND)
    assert "python -m ditfx.models.digits.train" in str(error.value)
