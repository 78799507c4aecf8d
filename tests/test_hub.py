"""The hub code paths, with the network calls patched: push_to_hub, then a pull by repo id from the cache."""

import shutil
from types import SimpleNamespace

import huggingface_hub
import torch
import transformers.utils.hub as transformers_hub
from huggingface_hub import ModelCard
from peft import PeftModel, get_peft_model

from peft_s2ft import S2FTConfig

REPO_ID = "someone/s2ft-tiny"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def test_push_to_hub_then_load_by_repo_id(load, input_ids, tmp_path, monkeypatch):
    uploaded = tmp_path / "uploaded"
    calls = []

    class OfflineApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id))
            return SimpleNamespace(repo_id=repo_id)

    def capture_upload(self, working_dir, repo_id, **kwargs):
        calls.append(("upload", repo_id))
        shutil.copytree(working_dir, uploaded)
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(transformers_hub, "hf_api", lambda: OfflineApi())
    monkeypatch.setattr(
        transformers_hub,
        "create_and_tag_model_card",
        lambda repo_id, tags=None, token=None, **kw: ModelCard("---\nlibrary_name: peft\n---\n"),
    )
    monkeypatch.setattr(transformers_hub.PushToHubMixin, "_upload_modified_files", capture_upload)

    model = get_peft_model(load("llama-gqa"), S2FTConfig(task_type="CAUSAL_LM", init_weights=False))
    expected = model(input_ids).logits
    model.push_to_hub(REPO_ID)
    assert calls == [("create_repo", REPO_ID), ("upload", REPO_ID)]
    assert {p.name for p in uploaded.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}

    # Lay the upload out as the local HF cache would hold it after a download, then load offline by id.
    cache = tmp_path / "hub_cache"
    repo_dir = cache / f"models--{REPO_ID.replace('/', '--')}"
    shutil.copytree(uploaded, repo_dir / "snapshots" / REVISION)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(REVISION)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    loaded = PeftModel.from_pretrained(load("llama-gqa"), REPO_ID, cache_dir=str(cache))
    torch.testing.assert_close(loaded(input_ids).logits, expected)
