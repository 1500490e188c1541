"""The registered PETL methods, what each would train on a chosen timm ViT, and where PETLab departs from the
official code."""

import sys

import pandas as pd
import streamlit as st

from core import methods
from core.backbone import BackboneSpec
from core.experiment import count_params, native_img_size

st.title("PETLab")
st.write(
    "Parameter-efficient fine-tuning of Vision Transformers: FacT, RLRR and KAdaptation beside LoRA, adapters, "
    "VPT, BitFit, SSF, linear probing and full fine-tuning. Fine-tune on the **Fine-tune** page, compare runs on "
    "**Runs** and **Pareto**, see what a run did to the weights on **Spectra**, and let **Intrinsic dimension** "
    "choose which matrices to adapt."
)
model_name = st.selectbox(
    "Backbone shape", ["vit_small_patch14_dinov2", "vit_tiny_patch16_224", "vit_base_patch16_224"]
)
classes = st.number_input("Classes", min_value=2, max_value=10_000, value=100)
shape = BackboneSpec(name=model_name, weights="none", img_size=native_img_size(model_name), num_classes=int(classes))
rows = []
for name in methods.list_methods():
    count = count_params(shape, name)  # on a weightless copy: shapes only
    method = methods.get_method(name)
    rows.append(
        {
            "method": name,
            "trainable (no head)": count.without_head,
            "trainable (with head)": count.with_head,
            "mergeable": method.mergeable,
            "what it does": method.summary,
            "paper": method.paper,
        }
    )
counts = st.column_config.NumberColumn(format="localized")
st.dataframe(
    pd.DataFrame(rows),
    hide_index=True,
    column_config={"trainable (no head)": counts, "trainable (with head)": counts},
)
st.caption("The Learn page explains each method: its update as formulas and its count in closed form.")

st.header("Learn: where PETLab differs from the official code")
st.markdown(
    "Where the papers' released code and the papers disagree, PETLab follows what produced the published numbers and "
    "offers the other reading as an option; where the code has a bug, PETLab fixes it and says so."
)
notes = [methods.get_method(name).differs_from_official for name in methods.list_methods()]
every_method = (
    "**Every method** wraps timm's own `nn.Linear` layers (no patched forwards, timm keeps its fused attention), and "
    "every run selects its checkpoint on validation and measures the test split once, where several official "
    "scripts report the best test accuracy over epochs."
)
st.markdown("\n".join(f"- {note}" for note in [*notes, every_method] if note))
with st.expander("Each method's notes, from its source"):
    by_module: dict[str, list[str]] = {}
    for name in methods.list_methods():
        by_module.setdefault(methods.get_method(name).config.__module__, []).append(name)
    for module_name, names in by_module.items():
        st.markdown(f"**{', '.join(names)}** (`{module_name}`)")
        st.text(sys.modules[module_name].__doc__ or "")
