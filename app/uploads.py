"""The user's own images in the pages: their upload as a zip archive (`core.data.uploads` does the work) and the
files of a folder dataset a run left out."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import streamlit as st

from app import state
from core.data import UploadLimits, default_data_root, list_uploads, suggested_name, unpack_upload


def upload_section(data_key: str) -> None:
    """An expander to upload a zip of images as a named dataset; once unpacked, the dataset is chosen in the data
    picker keyed ``data_key`` (`app.forms.data_inputs`), which must be drawn after this."""
    with st.expander("Upload your own images (zip)"):
        try:
            limits = UploadLimits.from_env()
        except ValueError as exc:
            st.error(f"Uploads are off: {exc}")
            return
        st.caption(
            "One folder per class (`cats/1.jpg`, `dogs/2.png`, ...), or a VTAB-1k task folder with its .txt lists; "
            f"{limits.describe()}. Unreadable images are left out at training, and listed with the run."
        )
        uploaded = list_uploads()
        if uploaded:
            st.caption("Uploaded so far: " + ", ".join(f"`{name}`" for name in uploaded))
        if not state.may_start():
            st.info("Sign in (in the sidebar) to upload images.")
            return
        archive = st.file_uploader(
            "Zip archive",
            type=["zip"],
            key=f"{data_key}.upload.file",
            max_upload_size=max(1, limits.archive_bytes // 2**20),
        )
        default_name = suggested_name(archive.name) if archive is not None else ""
        name = st.text_input("Dataset name", key=f"{data_key}.upload.name", placeholder=default_name).strip()
        if st.button("Unpack", key=f"{data_key}.upload.start", disabled=archive is None):
            try:
                upload = unpack_upload(archive, name or default_name, limits=limits)
            except ValueError as exc:
                st.error(str(exc))
            else:
                kind, path = upload.dataset.split(":", 1)
                st.session_state[f"{data_key}.name"] = f"{kind}:"
                st.session_state[f"{data_key}.path"] = path
                st.success(
                    f"Unpacked {upload.files:,} files ({upload.bytes / 2**20:.1f} MB) into {upload.path}; the dataset "
                    f"`{upload.dataset}` is chosen below (inside the data root {default_data_root()})."
                )


def skipped_files(run: Mapping[str, Any]) -> None:
    """A warning naming the files of the run's dataset that were left out (unreadable, empty, not images), if any."""
    skipped = run.get("skipped_files") or {}
    if not skipped.get("count"):
        return
    shown = len(skipped["first"])
    more = f" (the first {shown} below)" if skipped["count"] > shown else ""
    with st.expander(f":warning: {skipped['count']} file(s) of the dataset were left out{more}"):
        st.dataframe(pd.DataFrame(skipped["first"], columns=["file", "why"]), hide_index=True)
