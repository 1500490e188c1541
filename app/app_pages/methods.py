"""The registered PETL methods and what each would train on a chosen timm ViT."""

import pandas as pd
import streamlit as st
import timm
import torch

from core import methods

st.title("PETLab")
st.write(
    "Parameter-efficient fine-tuning of Vision Transformers: FacT, RLRR and KAdaptation beside LoRA, adapters, "
    "VPT, BitFit, SSF, linear probing and full fine-tuning. Fine-tuning, the SVD spectra, the intrinsic-dimension "
    "selection and the accuracy-versus-parameters front arrive as the engine lands; this page already reads the "
    "method library."
)
model_name = st.selectbox(
    "Backbone shape", ["vit_small_patch14_dinov2", "vit_tiny_patch16_224", "vit_base_patch16_224"]
)
classes = st.number_input("Classes", min_value=2, max_value=10_000, value=100)
rows = []
for name in methods.list_methods():
    with torch.device("meta"):  # shapes only: counts without allocating weights
        model = timm.create_model(model_name, pretrained=False, num_classes=int(classes))
        methods.apply(model, name)
    method = methods.get_method(name)
    rows.append(
        {
            "method": name,
            "trainable (no head)": methods.count_trainable(model, include_head=False),
            "trainable (with head)": methods.count_trainable(model, include_head=True),
            "mergeable": method.mergeable,
            "what it does": method.summary,
            "paper": method.paper,
        }
    )
st.dataframe(pd.DataFrame(rows), hide_index=True, use_container_width=True)
