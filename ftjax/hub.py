"""``training.push_to_hub``: upload the export folder (weights, tokenizer, model card) with
``huggingface_hub``. Checked before training, so an offline run fails in its first second rather
than after hours of training."""

from __future__ import annotations

from pathlib import Path

from ftjax.errors import FtjaxError
from ftjax.paths import hub_offline


def check_push(push_to_hub: bool, hub_model_id: str | None) -> None:
    """One clear line when a push was asked for but cannot happen."""
    if not push_to_hub:
        return
    if not hub_model_id:
        raise FtjaxError("training.push_to_hub needs training.hub_model_id (e.g. your-name/minilm-sentiment)")
    if hub_offline():
        raise FtjaxError("training.push_to_hub=true but the Hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE "
                         "is set): unset it, or push later with `huggingface-cli upload "
                         f"{hub_model_id} OUTPUT_DIR/export`")


def push(export_dir: str | Path, hub_model_id: str, private: bool) -> str:
    """Creates the model repo if needed and uploads ``export_dir``; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(hub_model_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=hub_model_id, folder_path=str(export_dir), repo_type="model",
                                   commit_message="Upload model trained with ftjax")
    except Exception as e:  # network, auth, permissions: the export stays on disk
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FtjaxError(f"push to the Hub ({hub_model_id}) failed: {first}; the export is in {export_dir}: "
                         f"upload it with `huggingface-cli upload {hub_model_id} {export_dir}`") from e
    return str(getattr(commit, "commit_url", commit))
