"""The acceptance bar: our model, loader and sampler reproduce the official implementation's numbers.

Every tensor of ``shared/parity`` within the fixture README's tolerances, loaded through the same
LDM->diffusers converter as the real checkpoint.
"""

import pytest
import torch

from instdiff_lib import parity
from instdiff_lib.model.config import DropFlags


@pytest.fixture(scope="module")
def unet(parity_path):
    return parity.load_parity_unet(parity_path)


def _assert_all(checks):
    bad = [str(c) for c in checks if not c.ok]
    assert not bad, "parity failures:\n" + "\n".join(bad)


def test_single_forward_tokens_and_eps(unet, parity_path):
    checks = parity.forward_checks(unet, parity_path)
    names = {c.name for c in checks}
    assert {"objs.all", "objs.test_mask", "objs.test_box", "objs.test_point", "objs.null_grounding",
            "eps.all", "eps.test_mask", "eps.test_box", "eps.test_point", "eps.null_grounding",
            "eps.all_gate_scale0"} <= names
    _assert_all(checks)


def test_every_unet_block(unet, parity_path):
    checks = parity.block_checks(unet, parity_path)
    assert len(checks) == 19
    _assert_all(checks)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "official-order"])
def test_plms_and_mis_runs(unet, parity_path, batched):
    checks = parity.sampler_checks(unet, parity_path, batched=batched)
    names = {c.name.split("]")[-1].split(".", 1)[-1] for c in checks}
    assert {"final", "trace.e_t", "trace.x_out", "trace.x_in"} <= names
    _assert_all(checks)


def test_fixture_signal_is_real(unet, parity_path):
    """Negative control: a wrong drop preset, or ScaleU off, is far outside tolerance."""
    from safetensors.torch import load_file

    inp = load_file(str(parity_path / "inputs.safetensors"))
    out = load_file(str(parity_path / "outputs.safetensors"))
    g = {k[len("grounding."):]: v for k, v in inp.items() if k.startswith("grounding.")}
    with torch.no_grad():
        eps_box = unet(inp["x"], inp["timesteps"], inp["context"], unet.tokenize(g, DropFlags.preset("box")))
        assert (eps_box - out["eps.test_mask"]).abs().max() > 100 * parity.TOLERANCES["eps"]
        unet.set_skip_mode("none")
        try:
            eps = unet(inp["x"], inp["timesteps"], inp["context"], unet.tokenize(g, DropFlags.preset("mask")))
        finally:
            unet.set_skip_mode("scaleu")
        assert (eps - out["eps.test_mask"]).abs().max() > 0.1


def test_presence_rule_scribble_in_padded_slot(unet):
    """Gap in the fixture: scribble coords in a padded slot (mask 0) still change the tokens (official rule),
    while a box in a padded slot changes nothing."""
    pn = unet.position_net
    g = pn.null_grounding(1, seg_size=32)
    g["masks"][0, 0] = 1
    g["boxes"][0, 0] = torch.tensor([0.1, 0.1, 0.5, 0.5])
    all_on = DropFlags.preset("all")
    base = unet.tokenize(g, all_on)
    g2 = {k: v.clone() for k, v in g.items()}
    g2["boxes"][0, 5] = torch.tensor([0.2, 0.2, 0.6, 0.6])
    assert torch.equal(unet.tokenize(g2, all_on), base)
    g3 = {k: v.clone() for k, v in g.items()}
    g3["scribbles"][0, 5] = torch.rand(40)
    changed = (unet.tokenize(g3, all_on) - base).abs().amax(-1)[0]
    assert changed[60 + 5] > 0 and changed[:60].max() == 0  # only the slot-5 scribble token moved
