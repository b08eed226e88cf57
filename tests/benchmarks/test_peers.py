"""The peers run mergeserve's own classify path: the model built as ``Engine._build`` builds it, the
product's decoder (and its errors), ``top_k``'s ranking and mergeserve's response body."""

import base64

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from benchmarks.serve.harness import png_b64
from benchmarks.serve.peers import PeerRequest, ServedModel, fastapi_app
from serving.archive import Limits, decode_images
from serving.errors import Problem
from training.backbones import create_backbone, get_spec, preprocess
from training.fold import materialise, to_delta
from training.lora import LoraSettings, attach_lora, get_adapter
from training.store import AdapterManifest, AdapterStore

NAMES = [f"c{i}" for i in range(5)]


@pytest.fixture(scope="module")
def model_args(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("adapters"))
    cfg = LoraSettings(rank=2)
    ad = {k: v + 0.05 * torch.randn_like(v) for k, v in get_adapter(attach_lora(
        create_backbone("vit_test", len(NAMES), seed=0), cfg, seed=0)).items()}
    AdapterStore(root).save(ad, AdapterManifest(name="g@v1", backbone="vit_test", format="lora", lora=cfg,
                                                class_names=NAMES))
    return {"backbone": "vit_test", "adapters": root, "name": "g@v1", "class_names": NAMES, "seed": 0,
            "version": 1, "max_images": 4, "max_image_pixels": 64 * 64}


def test_the_served_model_is_the_engines(model_args):
    served = ServedModel(model_args)
    tensors, man = AdapterStore(model_args["adapters"]).load("g@v1", backbone="vit_test")
    ref = materialise(create_backbone("vit_test", len(NAMES), seed=0).eval(), to_delta(tensors, man.lora))
    req = PeerRequest(images=png_b64(3, seed=1), top_k=2)
    x = served.decode(req)
    assert np.array_equal(x, decode_images([base64.b64decode(s) for s in req.images], 32, Limits()))
    with torch.inference_mode():
        want = ref(preprocess(get_spec("vit_test"), torch.from_numpy(x))).softmax(-1).numpy()
    probs = served.forward(x)
    np.testing.assert_allclose(probs, want, atol=1e-6)
    body = served.respond(req, probs)
    assert body["adapter_version"] == 1 and len(body["results"]) == 3
    assert [p["label"] for p in body["results"][0]] == [NAMES[i] for i in np.argsort(-want[0])[:2]]


def test_the_fastapi_peer_answers_as_mergeserve(model_args):
    http = TestClient(fastapi_app(model_args))
    one = http.post("/v1/classify", json={"image": "data:image/png;base64," + png_b64(1)[0], "top_k": 3}).json()
    assert len(one["predictions"]) == 3 and one["adapter_version"] == 1
    with pytest.raises(Problem) as e:  # the product's limits (max_images 4)
        http.post("/v1/classify", json={"images": png_b64(5)})
    assert e.value.status == 413
