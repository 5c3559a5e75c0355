"""Every model's saved config is its constructor's own arguments: a checkpoint rebuilds the
same architecture from the config alone, for every argument, including a non-default one."""
import inspect

import pytest
import torch

from dit import LightningDiT
from layers import check_config
from losses import PatchDiscriminator
from tokenizer import DINOv2, AlignTok, EncoderClassifier

ENCODER = dict(embed_dim=32, depth=2, num_heads=2, ffn="swiglu", patch_size=4, img_size=16, num_register_tokens=2)

# Each constructor argument set to a value other than its default.
CASES = {
    DINOv2: ENCODER,
    EncoderClassifier: dict(encoder_config=ENCODER, num_classes=7, encoder_size=8),
    AlignTok: dict(encoder_name="dinov2_vits14_reg", encoder_overrides=dict(depth=1, embed_dim=32, num_heads=2,
                                                                            patch_size=4, img_size=16),
                   latent_channels=6, adapter_hidden=24, decoder_width=16, decoder_multipliers=[1, 2],
                   decoder_res_blocks=1, image_size=16, encoder_size=32),
    LightningDiT: dict(input_size=4, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                       mlp_ratio=2.0, num_classes=5, qk_norm=True, use_rope=False),
    PatchDiscriminator: dict(in_channels=4, width=8, n_layers=2, norm="batch"),
}


@pytest.mark.parametrize("model_class", list(CASES), ids=lambda c: c.__name__)
def test_config_is_every_constructor_argument(model_class, tmp_path):
    arguments = CASES[model_class]
    signature = inspect.signature(model_class).parameters
    assert set(arguments) == set(signature), "the case must set every constructor argument"
    assert all(signature[name].default != value for name, value in arguments.items())
    model = model_class(**arguments)
    assert model.config == arguments
    # Through a checkpoint file, as the scripts save and read it.
    torch.save({"config": model.config, "model": model.state_dict()}, tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    rebuilt = model_class(**check_config(model_class, saved["config"], "model.pt"))
    assert rebuilt.config == model.config
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in saved["model"].items()}
    rebuilt.load_state_dict(saved["model"])


def test_config_is_a_copy_and_unknown_fields_are_refused():
    overrides = dict(depth=1, embed_dim=32, num_heads=2, patch_size=4, img_size=16)
    model = AlignTok("dinov2_vits14", overrides, latent_channels=4, decoder_width=16, decoder_multipliers=(1, 2),
                     decoder_res_blocks=0, image_size=8, encoder_size=16)
    overrides["depth"] = 5                           # the caller's dict changes later
    assert model.config["encoder_overrides"]["depth"] == 1
    with pytest.raises(ValueError, match="unknown AlignTok config field.*'decoder_heads'"):
        check_config(AlignTok, dict(model.config, decoder_heads=2), "tok.pt")
