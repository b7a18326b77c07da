"""Caption sampling seeds: a pure function of (run seed, key, captioner, caption index)."""

from dr_pipeline.generate.model_worker import caption_seeds


def test_caption_seeds_follow_the_key_not_its_place_in_the_batch():
    first = caption_seeds(7, "coca", ["cat", "dog"], 2)
    swapped = caption_seeds(7, "coca", ["dog", "cat"], 2)
    assert first == swapped[::-1]  # the batch a key is decoded in does not change its captions
    assert first[0] != first[1]  # two samples never share their captions' noise
    assert len(set(first[0])) == 2  # nor do two captions of one sample
    assert caption_seeds(8, "coca", ["cat"], 2)[0] != first[0]
    assert caption_seeds(7, "other", ["cat"], 2)[0] != first[0]
