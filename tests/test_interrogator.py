"""sdrt.Interrogator: BLIP's caption against transformers' generate, CLIP's rankings against a
float64 reference over the same features, the web UI's classic format, clip-interrogator's
modes, the feature cache, ONNX Runtime against torch, bad images, the CLI."""
from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from interrogator_files import image, write_lists  # noqa: E402 - tests/ is on the path
from PIL import Image

from sdrt.interrogator import InterrogateOptions, Interrogator, load_models, read_folder, strip_prompt, top_k
from sdrt.interrogator.core import CAPTION_PROMPT
from sdrt.interrogator.models import random_models
from sdrt.interrogator.terms import PACKAGE_LISTS, clip_interrogator_tables, package_data
from sdrt.interrogator.towers import create_towers


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    return write_lists(tmp_path_factory.mktemp("lists"))


@pytest.fixture(scope="module")
def models():
    return load_models("random:interrogator-tiny")


@pytest.fixture(scope="module")
def it(models, lists, tmp_path_factory):
    return Interrogator(models, create_towers("torch", models, "cpu"), read_folder(lists),
                        cache_dir=tmp_path_factory.mktemp("features"))


def hf_caption(models, img, num_beams, min_length, max_length):
    tok = models.blip_tokenizer
    ids = torch.tensor([tok(CAPTION_PROMPT).input_ids])
    out = models.blip.generate(pixel_values=torch.from_numpy(models.blip_pixels(img)), input_ids=ids,
                               num_beams=num_beams, min_length=min_length, max_length=max_length, do_sample=False)
    return strip_prompt(tok.decode(out[0], skip_special_tokens=True))


@pytest.mark.parametrize("num_beams", [1, 3])
def test_caption_equals_transformers_generate(it, models, num_beams):
    for seed in (0, 1):
        img = image(seed)
        ours = it.caption(img, num_beams=num_beams, min_length=10, max_length=20)
        assert ours == hf_caption(models, img, num_beams, 10, 20)
        assert len(models.blip_tokenizer(ours, add_special_tokens=False).input_ids) >= 6   # min_length counts the prompt


@pytest.mark.parametrize("num_beams", [1, 2, 4])
def test_caption_with_early_end_tokens_equals_transformers(lists, tmp_path, num_beams):
    """A decoder that likes its end token: beams finish at different lengths, the minimum length
    holds them back, the search's stopping rule decides (transformers' semantics)."""
    models = random_models("interrogator-tiny")
    eos = models.blip.config.text_config.sep_token_id
    with torch.no_grad():
        head = models.blip.text_decoder.cls.predictions
        head.bias[eos] += 4.5
    it = Interrogator(models, create_towers("torch", models, "cpu"), read_folder(lists), cache_dir=tmp_path)
    lengths = set()
    for seed in range(4):
        img = image(seed)
        ours = it.caption(img, num_beams=num_beams, min_length=7, max_length=30)
        assert ours == hf_caption(models, img, num_beams, 7, 30), seed
        lengths.add(len(ours.split()))
    assert max(lengths) < 26            # the end token did end captions before max_length


def test_rank_equals_float64_reference(it):
    for seed in range(3):
        features = it.image_features(image(seed))
        for name in ("flavors", "artists", "ci-artists"):
            table = it.table(name)
            sims = table.features.astype(np.float64) @ features.astype(np.float64)
            for reverse in (False, True):
                ranked = it.rank(features, table, 10, reverse=reverse)
                expected = np.argsort(sims if reverse else -sims, kind="stable")[:10]
                assert [t for t, _ in ranked] == [table.labels[i] for i in expected]
                np.testing.assert_allclose([s for _, s in ranked], sims[expected], rtol=0, atol=1e-6)
    assert abs(np.linalg.norm(features) - 1) < 1e-5


def test_features_are_clips_own(it, models):
    img = image(3)
    with torch.no_grad():
        pixels = torch.from_numpy(models.clip_pixels(img))
        ref = models.clip.visual_projection(models.clip.vision_model(pixel_values=pixels).pooler_output)[0].numpy()
        ids = models.clip_tokenizer(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = models.clip.text_projection(models.clip.text_model(input_ids=ids).pooler_output)[0].numpy()
    np.testing.assert_allclose(it.image_features(img), ref / np.linalg.norm(ref), atol=1e-6)
    np.testing.assert_allclose(it.text_features(["a cat"])[0], text / np.linalg.norm(text), atol=1e-6)


def test_top_k_breaks_ties_by_index():
    assert top_k(np.array([1.0, 3.0, 3.0, 2.0, 3.0]), 2) == [1, 2]
    assert top_k(np.array([1.0, 2.0]), 5) == [1, 0]
    assert top_k(np.zeros(3), 0) == []


def test_classic_is_the_webuis_format(it, lists):
    img = image(4)
    caption = it.caption(img)
    features = it.image_features(img)
    out = it.interrogate(img, mode="classic")
    expected = caption
    # a folder of lists: every list is a category (sorted by name), as in the web UI's interrogate/
    for name in ("artists", "flavors", "mediums", "movements", "negative"):
        table = it.table(name)
        sims = table.features.astype(np.float64) @ features
        expected += ", " + table.labels[int(np.argmax(sims))]
    assert out == expected


def test_classic_ranks_limit_topn_and_skip(it, lists, tmp_path, models):
    folder = tmp_path / "lists"
    folder.mkdir()
    (folder / "mediums.txt").write_text((lists / "mediums.txt").read_text())
    (folder / "flavors.top3.txt").write_text((lists / "flavors.txt").read_text())
    (folder / "movements.txt").write_text((lists / "movements.txt").read_text())
    opts = InterrogateOptions(return_ranks=True, dict_limit=50, skip_categories=("movements",))
    it2 = Interrogator(models, it.towers, read_folder(folder), cache_dir=tmp_path / "f", options=opts)
    img = image(5)
    caption = it2.caption(img)
    out = it2.interrogate(img)
    assert out.startswith(caption + ", (")
    parts = re.findall(r"\(([^()]*):([0-9.]+)\)", out[len(caption):])
    assert len(parts) == 3 + 1           # flavors.top3: three terms; mediums: one; movements skipped
    features = it2.image_features(img)
    flavors = (lists / "flavors.txt").read_text().splitlines()[:50]      # only the list's first dict_limit terms
    sims = it2.text_features(flavors).astype(np.float64) @ features
    probs = np.exp(100 * (sims - sims.max()))
    probs /= probs.sum()
    top = np.argsort(-probs, kind="stable")[:3]
    assert [p[0] for p in parts[:3]] == [flavors[i] for i in top]
    assert [float(p[1]) for p in parts[:3]] == pytest.approx([round(probs[i], 3) for i in top], abs=2e-3)


def test_fast_best_negative(it):
    img = image(6)
    caption = it.caption(img)
    features = it.image_features(img)
    merged = it._merged()
    fast = it.interrogate(img, mode="fast")
    tops = [t for t, _ in it.rank(features, merged, 32)]
    assert fast.startswith(caption + ", ")
    added = fast[len(caption) + 2:].split(", ")
    assert added == tops[:len(added)] and not it.at_max_len(fast)
    best = it.interrogate(img, mode="best")
    sims = it.similarities(features, [caption, fast, best])
    assert sims[2] >= sims[0] - 1e-6 and sims[2] >= sims[1] - 1e-6       # best is the most similar candidate
    negative = it.interrogate(img, mode="negative")
    terms = negative.split(", ")
    pool = set(it.table("ci-flavors").labels) | set(it.table("ci-negative").labels)
    assert terms and set(terms) <= pool and len(set(terms)) == len(terms)
    first = np.argmin(it.similarities(features, sorted(pool)))
    assert terms[0] == sorted(pool)[first]          # the chain starts from the least similar term


def test_chain_keeps_the_best_prompt(it):
    features = it.image_features(image(7))
    phrases = list(it.table("flavors").labels[:40])
    out = it.chain(features, phrases, min_count=2, max_count=6)
    parts = out.split(", ")
    assert len(parts) in range(1, 8) and set(parts) <= set(phrases)      # the start + at most 6
    # every prefix the chain walked is no better than what it returned
    sims = it.similarities(features, [", ".join(parts[:i]) for i in range(1, len(parts) + 1)])
    assert sims[-1] == pytest.approx(sims.max(), abs=1e-6)


def test_truncate_to_fit_keeps_whole_parts(it):
    text = ", ".join(f"word{i} thing{i}" for i in range(60))
    out = it.truncate_to_fit(text)
    assert text.startswith(out) and out.count(", ") < 59 and not it.at_max_len(out)
    assert it.at_max_len(text)


def test_feature_cache_reused_and_rebuilt_per_list(models, lists, tmp_path):
    towers = create_towers("torch", models, "cpu")
    first = Interrogator(models, towers, read_folder(lists), cache_dir=tmp_path)
    first.warm(["artists", "flavors", "mediums"])
    assert sorted(first.cache.built) == ["artists", "flavors", "mediums"]
    again = Interrogator(models, towers, read_folder(lists), cache_dir=tmp_path)
    again.warm(["artists", "flavors", "mediums", "ci-flavors"])       # ci-flavors: the same terms, the same file
    assert again.cache.built == []
    np.testing.assert_array_equal(again.table("flavors").features, first.table("flavors").features)
    changed = tmp_path / "changed"
    write_lists(changed, flavors=121)
    third = Interrogator(models, towers, read_folder(changed), cache_dir=tmp_path)
    third.warm(["artists", "flavors", "mediums"])
    assert third.cache.built == ["flavors"]
    # a damaged file is recomputed, never used
    path = third.cache.path(third.lists["mediums"])
    path.write_bytes(b"not a numpy file")
    fourth = Interrogator(models, towers, read_folder(changed), cache_dir=tmp_path)
    fourth.warm(["mediums"])
    assert fourth.cache.built == ["mediums"]
    np.testing.assert_array_equal(fourth.table("mediums").features, first.table("mediums").features)
    # another CLIP model: its own folder
    other = random_models("interrogator-tiny")
    with torch.no_grad():
        other.clip.text_projection.weight.mul_(2.0)
    other.clip_hash = "otherclip0"
    fifth = Interrogator(other, create_towers("torch", other, "cpu"), read_folder(lists), cache_dir=tmp_path)
    fifth.warm(["mediums"])
    assert fifth.cache.built == ["mediums"] and fifth.cache.folder != first.cache.folder


def test_package_lists_and_clip_interrogator_tables():
    lists = read_folder(package_data())
    assert set(PACKAGE_LISTS) <= set(lists)
    assert len(lists["artists"].items) == 5265 and len(lists["flavors"].items) > 100_000 - 100
    tables = clip_interrogator_tables(lists)
    assert len(tables["ci-artists"].items) == 2 * 5265
    assert tables["ci-artists"].items[0] == "by " + lists["artists"].items[0]
    assert tables["ci-artists"].items[5265] == "inspired by " + lists["artists"].items[0]
    assert "trending on Artstation" in tables["ci-trendings"].items and len(tables["ci-trendings"].items) == 72


def test_default_lists_classic_uses_the_webuis_four(models, tmp_path):
    """The package's lists: the classic format ranks the four the web UI downloads (not the
    negative terms), each over its first dict_limit terms."""
    from sdrt.interrogator.terms import WEBUI_CATEGORIES
    it = Interrogator(models, create_towers("torch", models, "cpu"), None, cache_dir=tmp_path,
                      options=InterrogateOptions(dict_limit=40))
    assert it.categories == WEBUI_CATEGORIES == ("artists", "flavors", "mediums", "movements")
    img = image(8)
    caption, features = it.caption(img), it.image_features(img)
    expected = caption
    for name in WEBUI_CATEGORIES:
        head = list(it.lists[name].items[:40])
        sims = it.text_features(head).astype(np.float16).astype(np.float64) @ features     # as the cache keeps them
        expected += ", " + head[int(np.argmax(sims))]
    assert it.interrogate(img) == expected


def _png(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def _animated():
    buf = io.BytesIO()
    frames = [image(i, 16, 16) for i in range(2)]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


@pytest.mark.parametrize("data, message", [
    (b"definitely not an image", "not a readable image"),
    (_png(image(0))[:200], "not a readable image"),
    (_png(Image.new("RGB", (1, 1))), "too small"),
    (_png(Image.new("CMYK", (32, 32)), format="JPEG"), "pixel format"),
    (_animated(), "animated"),
])
def test_bad_images_are_value_errors(it, data, message):
    with pytest.raises(ValueError, match=message):
        it.interrogate(data)


def test_huge_image_is_refused(it, monkeypatch):
    import sdrt.images
    monkeypatch.setattr(sdrt.images, "MAX_PIXELS", 32 * 32)
    with pytest.raises(ValueError, match="larger than"):
        it.interrogate(_png(image(0, 64, 64)))


def test_options_and_modes_are_checked(it):
    with pytest.raises(ValueError, match="mode"):
        it.interrogate(image(0), mode="poetic")
    with pytest.raises(ValueError, match="num_beams"):
        InterrogateOptions(num_beams=0).validate()
    with pytest.raises(ValueError, match="min_length"):
        InterrogateOptions(min_length=50, max_length=40).validate()
    assert InterrogateOptions().with_webui({"interrogate_clip_num_beams": 3, "other": 1}).num_beams == 3
    assert InterrogateOptions().with_webui({"interrogate_clip_skip_categories": ["a"]}).skip_categories == ("a",)
    with pytest.raises(ValueError, match="skip_categories"):
        InterrogateOptions().with_webui({"interrogate_clip_skip_categories": "movements"})
    with pytest.raises(ValueError, match="unknown"):
        it.table("nonexistent")
    with pytest.raises(ValueError, match="random:interrogator"):
        load_models("random:nothing")
    with pytest.raises(ValueError, match="neither a folder"):
        load_models("/no/such/folder")


def test_onnxruntime_equals_torch(it, models, lists, tmp_path):
    pytest.importorskip("onnxruntime")
    ort_it = Interrogator(models, create_towers("onnxruntime", models, "cpu", engine_dir=tmp_path / "engines"),
                          read_folder(lists), cache_dir=tmp_path / "features")
    img = image(9)
    np.testing.assert_allclose(ort_it.image_features(img), it.image_features(img), atol=1e-5)
    texts = list(it.lists["flavors"].items[:64])
    np.testing.assert_allclose(ort_it.text_features(texts), it.text_features(texts), atol=1e-5)
    for beams in (1, 2):
        assert ort_it.caption(img, num_beams=beams) == it.caption(img, num_beams=beams)
    for mode in ("classic", "fast"):
        assert ort_it.interrogate(img, mode=mode) == it.interrogate(img, mode=mode)
    # the folder is reused: nothing is exported again
    from sdrt.export.interrogator import build_interrogator
    messages = []
    build_interrogator(models, tmp_path / "engines", log=messages.append)
    assert messages and all(m.endswith("up to date") for m in messages)


def test_tensorrt_profiles_cover_what_runs(models, it):
    from sdrt.export.interrogator import INTERROGATOR_NETWORKS, tensorrt_shapes
    shapes = tensorrt_shapes(models, max_length=it.options.max_length)
    assert set(shapes) == set(INTERROGATOR_NETWORKS)
    for name, inputs in shapes.items():
        assert set(inputs) == {t.name for t in INTERROGATOR_NETWORKS[name].inputs}
        for lo, opt, hi in inputs.values():
            assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    embeds = it.towers.blip_vision(models.blip_pixels(image(0)))
    assert shapes["blip_cross"]["image_embeds"][0][1:] == embeds.shape[1:]
    cross = it.towers.blip_cross(embeds)
    assert shapes["blip_step"]["cross"][0] == cross.shape


def test_cli_interrogate(lists, tmp_path, capsys, monkeypatch):
    from sdrt.cli import main
    monkeypatch.setenv("SDRT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "some.png"
    image(10).save(path)
    assert main(["interrogate", str(path), "--model", "random:interrogator-tiny", "--lists", str(lists), "-q"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.count(", ") >= 5
    assert main(["interrogate", str(tmp_path / "missing.png"), "--lists", str(lists), "-q"]) == 2
    assert "nor an existing file" in capsys.readouterr().err


def test_tensorrt_profiles_build_on_the_fake_and_run_at_their_ends(models, tmp_path):
    """Each interrogator graph (as exported, before ONNX Runtime's optimisations) builds with the
    declared profile on the TensorRT fake (inputs named as the spec, min <= opt <= max), every
    profile shape fits the graph's ranks and fixed dimensions, and ONNX Runtime runs the graph at
    the profile's smallest and largest shapes."""
    import onnx
    import onnxruntime as ort
    import tensorrt_fake as fake

    from sdrt.export.interrogator import export_graph, tensorrt_shapes
    from sdrt.export.tensorrt import BuildOptions, build_engine

    shapes = tensorrt_shapes(models)
    for name, inputs in shapes.items():
        path = export_graph(models, name, tmp_path / f"{name}.onnx")
        plan = build_engine(fake.module(), path, name, inputs, BuildOptions(precision="fp32"))
        assert plan.startswith(b"fake-plan|")
        graph = onnx.load(str(path), load_external_data=False).graph
        dims = {i.name: [d.dim_value or None for d in i.type.tensor_type.shape.dim] for i in graph.input}
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for end in (0, 2):
            feed = {}
            for input_name, triple in inputs.items():
                shape = triple[end]
                assert len(shape) == len(dims[input_name])
                assert all(d is None or d == s for d, s in zip(dims[input_name], shape)), (name, input_name)
                feed[input_name] = (np.ones(shape, np.int64) if input_name == "input_ids"
                                    else np.zeros(shape, np.float32))
            outputs = session.run(None, feed)
            assert all(np.isfinite(o).all() for o in outputs)
            if name == "blip_step":          # logits per beam; the cache grows by the new tokens
                k, t = inputs["input_ids"][end]
                assert outputs[0].shape[0] == k and outputs[1].shape[4] == inputs["past"][end][4] + t


def test_a_folder_in_transformers_layout_loads_the_same_model(models, tmp_path):
    root = tmp_path / "interrogator"
    models.clip.save_pretrained(root / "clip")
    models.clip_tokenizer.save_pretrained(root / "clip")
    models.blip.save_pretrained(root / "blip")
    models.blip_tokenizer.save_pretrained(root / "blip")
    loaded = load_models(root)
    assert loaded.name == str(root) and loaded.clip_size == models.clip_size
    assert loaded.model_hash == load_models(root).model_hash              # from the files, stable
    img = image(11)
    a, b = (create_towers("torch", m, "cpu") for m in (models, loaded))
    np.testing.assert_array_equal(a.clip_image(models.clip_pixels(img)), b.clip_image(loaded.clip_pixels(img)))
    assert loaded.blip_tokenizer("a picture of ").input_ids == models.blip_tokenizer("a picture of ").input_ids
    assert loaded.blip_tokenizer.bos_token_id == models.blip_tokenizer.bos_token_id
    # the two folders apart; a CLIP folder without tokenizer files gets the CLIP vocabulary
    for p in (root / "clip").glob("*"):
        if p.name not in ("config.json",) and p.suffix not in (".safetensors", ".bin"):
            p.unlink()
    apart = load_models(None, clip=root / "clip", blip=root / "blip")
    assert apart.clip_tokenizer("a cat").input_ids == models.clip_tokenizer("a cat").input_ids
    with pytest.raises(ValueError, match="no config.json"):
        load_models(None, clip=tmp_path, blip=root / "blip")
    (root / "blip" / "tokenizer.json").unlink()
    for name in ("vocab.txt", "tokenizer_config.json"):
        if (root / "blip" / name).is_file():
            (root / "blip" / name).unlink()
    with pytest.raises(ValueError, match="tokenizer files"):
        load_models(None, clip=root / "clip", blip=root / "blip")


def test_short_batches_equal_77_token_features(it, models):
    """Texts are encoded in length-sorted batches as long as their longest text: the same
    features as CLIP's 77-token windows (padding after the end token changes nothing)."""
    texts = ["a", "a red boat on a quiet lake at dawn", "cat", ", ".join(["golden hour"] * 40), "an oil painting"]
    with torch.no_grad():
        ids = models.clip_tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                                    return_tensors="pt").input_ids
        ref = models.clip.text_projection(models.clip.text_model(input_ids=ids).pooler_output).numpy()
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)
    old = it.chunk
    try:
        it.chunk = 2                       # several batches of different lengths
        np.testing.assert_allclose(it.text_features(texts), ref, atol=2e-6)
    finally:
        it.chunk = old


def test_the_decoder_runs_only_new_tokens_after_the_prompt(it):
    calls = []
    step = it.towers.blip_step

    def recording(ids, past, cross):
        calls.append((ids.shape, past.shape[4]))
        return step(ids, past, cross)
    it.towers.blip_step = recording
    try:
        for beams in (1, 3):
            calls.clear()
            it.caption(image(12), num_beams=beams, min_length=10, max_length=16)
            assert calls[0][1] == 0 and calls[0][0][1] == 4           # the prompt, over an empty cache
            assert all(shape[1] == 1 and cached == 3 + i for i, (shape, cached) in enumerate(calls[1:], 1))
    finally:
        del it.towers.blip_step


def test_openclip_style_text_towers_batch_exactly(tmp_path):
    """OpenCLIP's towers (SD 2.x's ViT-H, SDXL's bigG) as transformers folders: gelu, the legacy
    end-token rule (pooling at the largest id), padding with id 0. Short batches stay exact."""
    from transformers import CLIPConfig, CLIPModel

    from sdrt.tokenizer import OPENCLIP_PAD, clip_tokenizer
    models = random_models("interrogator-tiny")
    cfg = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      vocab_size=49408, max_position_embeddings=77, hidden_act="gelu",
                                      eos_token_id=2, bos_token_id=0, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8, hidden_act="gelu"),
                     projection_dim=24)
    torch.manual_seed(3)
    models.clip, models.clip_tokenizer = CLIPModel(cfg).eval(), clip_tokenizer(OPENCLIP_PAD)
    it = Interrogator(models, create_towers("torch", models, "cpu"), {}, cache_dir=tmp_path, chunk=2)
    texts = ["a", "a castle in the clouds, matte painting", "fog", "by an unknown artist"]
    with torch.no_grad():
        ids = models.clip_tokenizer(texts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert (ids == 0).any()                           # padded with 0, as OpenCLIP pads
        ref = models.clip.text_projection(models.clip.text_model(input_ids=ids).pooler_output).numpy()
    np.testing.assert_allclose(it.text_features(texts), ref / np.linalg.norm(ref, axis=-1, keepdims=True), atol=2e-6)
    assert it.image_features(image(0)).shape == (24,)
