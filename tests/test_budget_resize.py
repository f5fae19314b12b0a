"""The weak mode's layer conversions (FlexiDiT): exact identities in float64."""
import pytest
import torch
import torch.nn.functional as F

from ditfx.budget import coarse_sincos_pos_embed, pi_resize, resize_deembed, resize_matrix
from ditfx.models.dit import sincos_2d_pos_embed


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_the_resize_matrix_is_the_resize(mode):
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    b = resize_matrix(2, 4, mode)
    expected = F.interpolate(x, size=(4, 4), mode=mode, align_corners=False)
    torch.testing.assert_close((x.reshape(3, 4) @ b.T).reshape(3, 1, 4, 4), expected)
    torch.testing.assert_close(resize_matrix(2, 2, mode), torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("p, q", [(2, 4), (2, 3), (1, 2)])
def test_a_resized_patch_gives_the_token_the_patch_gave(p, q):
    """PI-resize: <B x, w'> = <x, w> for every p x p patch x (upsampling), per output and input channel."""
    weight = torch.randn(8, 3, p, p, dtype=torch.float64)
    new = pi_resize(weight, q)
    patches = torch.randn(5, 3, p, p, dtype=torch.float64)
    resized = F.interpolate(patches, size=(q, q), mode="bilinear", align_corners=False)
    tokens = torch.einsum("nchw,ochw->no", patches, weight)
    torch.testing.assert_close(torch.einsum("nchw,ochw->no", resized, new), tokens, rtol=0, atol=1e-10)


def test_a_coarse_token_decodes_to_the_resized_patch():
    p, q, c, d = 2, 4, 3, 16
    weight, bias = torch.randn(p * p * c, d, dtype=torch.float64), torch.randn(p * p * c, dtype=torch.float64)
    token = torch.randn(d, dtype=torch.float64)
    native = (weight @ token + bias).reshape(p, p, c).permute(2, 0, 1)  # (C, p, p)
    new_w, new_b = resize_deembed(weight, bias, p, q, c)
    coarse = (new_w @ token + new_b).reshape(q, q, c).permute(2, 0, 1)
    expected = F.interpolate(native[None], size=(q, q), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(coarse, expected)
    cpp_w, cpp_b = resize_deembed(weight.reshape(p, p, c, d).permute(2, 0, 1, 3).reshape(-1, d),
                                  bias.reshape(p, p, c).permute(2, 0, 1).reshape(-1), p, q, c, layout="cpp")
    torch.testing.assert_close(cpp_w.reshape(c, q, q, d).permute(1, 2, 0, 3).reshape(-1, d), new_w)
    torch.testing.assert_close(cpp_b.reshape(c, q, q).permute(1, 2, 0).reshape(-1), new_b)


def test_coarse_positions_are_patch_centres_in_native_units():
    torch.testing.assert_close(coarse_sincos_pos_embed(32, 8, 1), sincos_2d_pos_embed(32, 8))
    table = coarse_sincos_pos_embed(32, 8, 2)
    assert table.shape == (16, 32)
    # the coarse patch (row 1, col 2) sits at native position (2*1+1, 2*2+1) = (3, 5): between native patches
    native_16 = sincos_2d_pos_embed(32, 16)  # a grid whose integer positions include 3 and 5
    torch.testing.assert_close(table[1 * 4 + 2], native_16[3 * 16 + 5])


@pytest.mark.parametrize("call, match", [
    (lambda: resize_matrix(2, 4, "nearest"), "resize mode"),
    (lambda: pi_resize(torch.randn(2, 3, 2, 3), 4), "square kernels"),
    (lambda: resize_deembed(torch.randn(10, 4), None, 2, 4, 3), "expected p\\*p\\*channels"),
    (lambda: coarse_sincos_pos_embed(32, 8, 3), "stride must divide"),
])
def test_bad_arguments_are_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()
